"""Progress of a long phase: a bar on a terminal, one line with its count and time in a log.

tqdm switches itself off when stderr is not a terminal, which left a run in a log silent for minutes: there, each
phase ends with one line (logger ``onnx_arsvd`` at INFO level, which the CLI shows unless ``-q``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

logger = logging.getLogger("onnx_arsvd")


class _Phase:
    """What a bar offers (update, postfix, total, context and iteration), logging one line when it closes."""

    def __init__(self, iterable: Iterable[Any] | None, desc: str, unit: str, total: float | None) -> None:
        self.iterable, self.desc, self.unit, self.total = iterable, desc, unit, total
        self.n = 0
        self._start = time.perf_counter()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None  # only an iterable's phase is iterated
        for item in self.iterable:
            yield item
            self.n += 1
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += int(n)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """The bar's live figures: a log line has none."""

    def refresh(self) -> None:
        """Nothing to redraw in a log."""

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            logger.info(f"{self.desc}: {self.n:,} {_plural(self.unit, self.n)} in "
                        f"{time.perf_counter() - self._start:.1f} s")

    def __enter__(self) -> _Phase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plural(unit: str, count: float) -> str:
    if count == 1:
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def progress_bar(iterable: Iterable[Any] | None = None, *, progress: bool, desc: str, unit: str,
                 total: float | None = None, **options: Any) -> Any:
    """A tqdm bar when ``progress`` and stderr is a terminal; one log line at the phase's end when ``progress`` and
    it is not; nothing without ``progress``."""
    if progress and not sys.stderr.isatty():
        return _Phase(iterable, desc, unit, total)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not progress, **options)
