"""Data given one feed per session call: for models whose batch axis is not the first (a recurrent state of
shape [2, batch, 128]) or that have no sample axis at all, where arrays with samples on the first axis cannot
hold the data.

Per-call data is a folder of ``.npz`` files (one call each, in file-name order), a ``CalibrationDataReader``, or
a sequence of mappings. Each feed is checked against the model's inputs like one call (``check_feed`` without
samples), and a call is the unit the data is split, counted and bounded by: one sample per call. Labels, when
a call has them, are its own ``labels`` array (one per row of the first output's class scores); either every
call has them or none.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.io.arrays import DataSource, open_arrays
from onnx_arsvd.io.data import (
    CalibrationDataReader,
    Feed,
    InputSpec,
    Session,
    check_feed,
    check_labels,
    input_specs,
    label_problem,
    sample_count,
)

__all__ = ["MAX_CALL_FILES", "Calls", "DataInput", "as_arrays", "count", "described", "is_per_call", "load_calls",
           "read_calls"]

logger = logging.getLogger("onnx_arsvd")

MAX_CALL_FILES = 100_000
"""The most ``.npz`` files a folder of calls may hold: beyond it the folder is refused before any is read."""


@dataclass(frozen=True)
class Calls:
    """Checked feeds, one per session call, and each call's labels (None when the calls have none)."""

    feeds: tuple[Feed, ...]
    labels: tuple[np.ndarray, ...] | None = None
    where: str = "calls"
    files: tuple[Path, ...] = ()
    """The files the calls were read from (a folder's), which no output may replace."""

    def __len__(self) -> int:
        return len(self.feeds)

    def take(self, indices: Sequence[int] | np.ndarray) -> Calls:
        """The calls at ``indices``, in that order."""
        return Calls(tuple(self.feeds[i] for i in indices),
                     None if self.labels is None else tuple(self.labels[i] for i in indices), self.where, self.files)

    def split(self, share: float, seed: int) -> tuple[Calls, Calls]:
        """A seeded random split by call: (the rest, ``share`` of the calls), each in the original order."""
        held = max(1, round(share * len(self)))
        if len(self) - held < 1:
            raise InvalidInputError(f"{self.where}: {len(self)} calls are too few to split into calibration and "
                                    "held-out parts")
        order = np.random.default_rng(seed).permutation(len(self))
        return self.take(np.sort(order[held:])), self.take(np.sort(order[:held]))

    def all_labels(self) -> np.ndarray | None:
        """Every call's labels, in call order."""
        return None if self.labels is None else np.concatenate(self.labels)

    def without_labels(self) -> Calls:
        return Calls(self.feeds, None, self.where, self.files)

    def first(self, count: int) -> Calls:
        return self.take(range(min(count, len(self))))

    def reader(self) -> _CallReader:
        """A ``CalibrationDataReader`` over the calls."""
        return _CallReader(self.feeds)


DataInput = DataSource | CalibrationDataReader | Sequence[Mapping[str, np.ndarray]] | Calls
"""Data in any form: arrays with samples on the first axis (an ``.npz`` path, a mapping), or one feed per call."""


class _CallReader:
    def __init__(self, feeds: Sequence[Feed]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> Feed | None:
        return next(self._feeds, None)


def is_per_call(data: object) -> bool:
    """Whether ``data`` gives one feed per call: a folder, a reader (``get_next()``), or a list or tuple of
    mappings (arrays with samples on the first axis are an ``.npz`` path or one mapping)."""
    if isinstance(data, Calls):
        return True
    if isinstance(data, (str, os.PathLike)):
        return Path(data).is_dir()
    if isinstance(data, (list, tuple)):
        return all(isinstance(feed, Mapping) for feed in data)
    return callable(getattr(data, "get_next", None))


def _folder_files(folder: Path) -> list[Path]:
    """The folder's ``.npz`` files in name order: regular files only (a link is refused, so nothing is read
    from outside the folder), and no more than :data:`MAX_CALL_FILES`."""
    files: list[Path] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if not entry.name.endswith(".npz"):
                continue
            if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                raise InvalidInputError(f"{folder}: {entry.name!r} is not a regular file (links are not followed)")
            files.append(Path(entry.path))
            if len(files) > MAX_CALL_FILES:
                raise InvalidInputError(f"{folder}: more than {MAX_CALL_FILES} .npz files")
    if not files:
        raise InvalidInputError(f"{folder}: a folder of calls holds one .npz file per call (arrays keyed by input "
                                "name, as one call takes them); this one has none")
    return sorted(files, key=lambda path: path.name)


def _raw_calls(data: object) -> tuple[str, list[tuple[str, Mapping[str, np.ndarray] | Path]]]:
    """Where the calls come from, and each call's name and its feed (or the file that holds it)."""
    if isinstance(data, (str, os.PathLike)):
        folder = Path(data)
        return os.fspath(data), [(f"{folder / path.name}", path) for path in _folder_files(folder)]
    if isinstance(data, (list, tuple)):
        return "calls", [(f"call {i + 1}", feed) for i, feed in enumerate(data)]
    raw: list[tuple[str, Mapping[str, np.ndarray] | Path]] = []
    while (feed := data.get_next()) is not None:  # type: ignore[attr-defined]
        if not isinstance(feed, Mapping):
            raise InvalidInputError(f"data reader: feed {len(raw) + 1} is {type(feed).__name__}, not a dict")
        raw.append((f"data reader feed {len(raw) + 1}", feed))
    return "data reader", raw


def read_calls(data: object, specs: list[InputSpec]) -> Calls:
    """The per-call ``data`` (see :func:`is_per_call`) checked against the model's inputs ``specs``."""
    if isinstance(data, Calls):
        return data
    where, raw = _raw_calls(data)
    if not raw:
        raise InvalidInputError(f"{where}: no calls")
    feeds: list[Feed] = []
    labels: list[np.ndarray] = []
    for name, source in raw:
        with open_arrays(source) as arrays:
            feeds.append(check_feed(arrays, specs, name, samples=False))
            if (own := arrays.get("labels")) is not None:
                own = np.asarray(own)
                if own.ndim != 1 or own.dtype.kind not in "iu":
                    raise InvalidInputError(f"{name}: labels must be a 1-D integer array, got {own.dtype} of shape "
                                            f"{own.shape}")
                labels.append(own)
    if labels and len(labels) != len(feeds):
        raise InvalidInputError(f"{where}: {len(labels)} of {len(feeds)} calls have labels; give every call its "
                                "labels or none")
    files = tuple(path for _, path in raw if isinstance(path, Path))
    return Calls(tuple(feeds), tuple(labels) if labels else None, where, files)


def load_calls(data: object, labels: object, model: ir.Model | Session) -> Calls:
    """The per-call ``data`` checked for ``model``, with its calls' own labels checked against the first output, or
    left out with a warning when that output cannot take labels."""
    if labels is not None:
        raise InvalidInputError("per-call data holds each call's labels in the call itself (a 'labels' array in "
                                "each file or feed): labels given apart cannot be split by call")
    calls = read_calls(data, input_specs(model))
    if (given := calls.all_labels()) is None:
        return calls
    if problem := label_problem(model):
        logger.warning(f"{calls.where}: its calls' 'labels' arrays are left out: {problem}")
        return calls.without_labels()
    check_labels(given, len(given), model, calls.where)
    return calls


def as_arrays(data: DataInput) -> DataSource:
    """``data`` that :func:`is_per_call` said holds samples on the first axis: an ``.npz`` path or a mapping."""
    if not isinstance(data, (str, os.PathLike, Mapping)) or isinstance(data, Calls):
        raise TypeError(f"arrays expected, got {type(data).__name__}")
    return data


def described(data: DataInput) -> str:
    """How a message names the data: its path, the calls' source, or "the data"."""
    if isinstance(data, Calls):
        return data.where
    return os.fspath(data) if isinstance(data, (str, os.PathLike)) else "the data"


def count(data: Mapping[str, np.ndarray] | Calls) -> int:
    """Samples in arrays (the first axis), or calls."""
    return len(data) if isinstance(data, Calls) else sample_count(data)
