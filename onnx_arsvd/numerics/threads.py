"""How many weights to factor at once, and the BLAS threads each may use.

Every job runs its BLAS and LAPACK calls on one thread: on a machine shared with other work,
two OpenBLAS threads per SVD made SVDs 5-16x slower than one, and one thread per job keeps the
results bit-identical whatever the number of jobs. So ``jobs`` x 1 thread never exceeds the cores.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from typing import TypeVar

from onnx_arsvd.errors import InvalidInputError

__all__ = ["available_cores", "in_jobs", "job_count", "single_threaded_blas"]

Item = TypeVar("Item")
Result = TypeVar("Result")


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


def in_jobs(work: Callable[[Item], Result], items: Sequence[Item], jobs: int,
            done: Callable[[Result], None] = lambda _: None) -> list[Result]:
    """``work(item)`` for every item, ``jobs`` at a time (threads, one BLAS thread each), the results in order.

    ``done`` sees each result as it completes, in the calling thread (a progress bar, a spill). On an error or
    Ctrl-C the items not started yet are dropped, not worked through first.
    """
    pool = ThreadPoolExecutor(job_count(jobs))
    with single_threaded_blas():
        try:
            futures = [pool.submit(work, item) for item in items]
            for future in as_completed(futures):
                done(future.result())
            return [future.result() for future in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
