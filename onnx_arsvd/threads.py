"""How many weights to factor at once, and the BLAS threads each may use.

Every job runs its BLAS and LAPACK calls on one thread: on a machine shared with other work,
two OpenBLAS threads per SVD made SVDs 5-16x slower than one, and one thread per job keeps the
results bit-identical whatever the number of jobs. So ``jobs`` x 1 thread never exceeds the cores.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from onnx_arsvd.errors import InvalidInputError

__all__ = ["available_cores", "job_count", "single_threaded_blas"]


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def job_count(jobs: int) -> int:
    """``jobs`` checked, and capped at the available cores."""
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidInputError(f"jobs must be a positive integer, got {jobs!r}")
    return min(jobs, available_cores())


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Limit every loaded BLAS (numpy's and scipy's OpenBLAS, MKL, ...) to one thread, then restore it."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
