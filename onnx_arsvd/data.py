"""The one place that loads and validates data: ``.npz`` files, arrays, labels and calibration readers.

Arrays are keyed by graph input name with samples on the first axis. Before any work each array
is checked against the model's input: present, of a castable dtype, of the input's rank, with its
fixed dims, at least one sample, all inputs with the same sample count, and finite. Labels are
1-D integers, one per sample, and only for a first output that can be argmaxed into classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError

__all__ = [
    "ArrayReader",
    "CalibrationDataReader",
    "CheckedReader",
    "Feed",
    "InputSpec",
    "check_feed",
    "check_labels",
    "input_specs",
    "load_labels",
    "read_arrays",
    "split_batches",
]

Feed = dict[str, np.ndarray]
DataSource = str | os.PathLike | Mapping[str, np.ndarray]


class CalibrationDataReader(Protocol):
    """onnxruntime's calibration protocol: feeds until ``get_next()`` returns None."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


@dataclass(frozen=True)
class InputSpec:
    """A graph input the data must feed: name, dtype and dims (None where dynamic)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    def describe(self) -> str:
        dims = "?" if self.shape is None else ", ".join("N" if d is None else str(d) for d in self.shape)
        return f"{self.dtype} ({dims})"


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The inputs a feed must hold: graph inputs that are not initializers (IR 3 lists those too)."""
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise UnsupportedModelError(f"input {value.name!r} has no tensor type")
        try:
            dtype = np.dtype(value.dtype.numpy())
        except (TypeError, ValueError):
            raise UnsupportedModelError(f"input {value.name!r} has unsupported type {value.dtype}") from None
        shape = None if value.shape is None else tuple(d if isinstance(d, int) else None for d in value.shape)
        specs.append(InputSpec(value.name or "", dtype, shape))
    return specs


def read_arrays(data: DataSource, what: str = "--data") -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` path or a mapping, without pickles."""
    if isinstance(data, Mapping):
        return {str(key): np.asarray(value) for key, value in data.items()}
    path = Path(data)
    if not path.is_file():
        raise InvalidInputError(f"{os.fspath(data)}: no such {what} file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise ValueError("a single array, not an archive of arrays keyed by input name")
            return {key: archive[key] for key in archive.files}
    except Exception as error:
        raise InvalidInputError(f"{path}: not a readable .npz file ({error})") from error


def _check_array(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    expected = f"input {spec.name!r} expects {spec.describe()} with samples on the first axis"
    if array.ndim == 0:
        raise InvalidInputError(f"{where}: array {spec.name!r} is 0-d; {expected}")
    if array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        raise InvalidInputError(f"{where}: array {spec.name!r} is {array.dtype}; {expected}")
    if spec.shape is not None:
        fixed = [(i, d) for i, d in enumerate(spec.shape) if d is not None and i > 0]
        first = spec.shape[0] if spec.shape else None
        if (array.ndim != len(spec.shape) or any(array.shape[i] != d for i, d in fixed)
                or (first is not None and len(array) < first)):
            raise InvalidInputError(f"{where}: array {spec.name!r} has shape {array.shape}; {expected}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{where}: array {spec.name!r} holds NaN or Inf values")
    return array.astype(spec.dtype, copy=False)


def check_feed(arrays: Mapping[str, np.ndarray], specs: list[InputSpec], where: str, *, samples: bool = True) -> Feed:
    """The arrays the model's inputs need, checked and cast; ``samples`` also demands one common count."""
    feed: Feed = {}
    for spec in specs:
        if spec.name not in arrays:
            raise InvalidInputError(f"{where}: no array for model input {spec.name!r} "
                                    f"(has: {', '.join(arrays) or 'nothing'})")
        feed[spec.name] = _check_array(np.asarray(arrays[spec.name]), spec, where)
    if samples and feed:
        counts = {len(a) for a in feed.values()}
        if len(counts) != 1:
            raise InvalidInputError(f"{where}: input arrays have different sample counts {sorted(counts)}")
        if counts == {0}:
            raise InvalidInputError(f"{where}: the arrays hold no sample")
    return feed


def load_labels(labels: np.ndarray | str | os.PathLike) -> np.ndarray:
    """Labels from a ``.npy`` path, or the array given."""
    if not isinstance(labels, (str, os.PathLike)):
        return np.asarray(labels)
    if not Path(labels).is_file():
        raise InvalidInputError(f"{os.fspath(labels)}: no such labels file")
    try:
        loaded = np.load(labels, allow_pickle=False)
    except Exception as error:
        raise InvalidInputError(f"{os.fspath(labels)}: cannot read labels ({error})") from error
    if not isinstance(loaded, np.ndarray):
        raise InvalidInputError(f"{os.fspath(labels)}: labels must be one .npy array, not an archive")
    return loaded


def _classes(model: ir.Model) -> int | None:
    """How many classes the first output's argmax picks from (None if not known); error if it cannot."""
    output = model.graph.outputs[0]
    if output.dtype is not None and not output.dtype.is_floating_point():
        raise InvalidInputError(f"labels need a float first output to argmax; {output.name!r} is {output.dtype}")
    if output.shape is None:
        return None
    if len(output.shape) < 2:
        raise InvalidInputError(f"labels need a first output of shape (samples, classes); {output.name!r} has "
                                f"rank {len(output.shape)}")
    dims = [d for d in output.shape[1:]]
    if all(isinstance(d, int) for d in dims):
        classes = int(np.prod(dims))
        if classes < 2:
            raise InvalidInputError(f"labels need at least 2 classes; output {output.name!r} has {classes}")
        return classes
    return None


def check_labels(labels: np.ndarray, samples: int, model: ir.Model, where: str = "labels") -> np.ndarray:
    """1-D integer labels, one per sample, in range of the first output's classes."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InvalidInputError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != samples:
        raise InvalidInputError(f"{where}: {len(labels)} labels for {samples} samples")
    classes = _classes(model)
    if len(labels) and (labels.min() < 0 or (classes is not None and labels.max() >= classes)):
        raise InvalidInputError(f"{where}: labels must lie in [0, {classes if classes is not None else 'classes'})")
    return labels


def split_batches(feed: Feed, specs: list[InputSpec], batch_size: int) -> Iterator[Feed]:
    """Slices of the data along the first axis; a fixed batch dim in the model sets the slice size."""
    fixed = next((s.shape[0] for s in specs if s.shape and s.shape[0]), None)
    step = fixed or batch_size
    total = len(next(iter(feed.values()))) if feed else 0
    stop = total - total % step if fixed else total
    for start in range(0, stop, step):
        yield {name: array[start : start + step] for name, array in feed.items()}


class ArrayReader:
    """A ``CalibrationDataReader`` over an ``.npz`` or a mapping of arrays, in batches of ``batch_size``."""

    def __init__(self, data: DataSource, specs: list[InputSpec], batch_size: int = 256, what: str = "--calibration") -> None:
        where = "calibration arrays" if isinstance(data, Mapping) else os.fspath(data)
        feed = check_feed(read_arrays(data, what), specs, where)
        self._batches: Iterator[Feed] = split_batches(feed, specs, batch_size)

    def get_next(self) -> Feed | None:
        return next(self._batches, None)


class CheckedReader:
    """A user's ``CalibrationDataReader`` whose every feed is checked like an array file's."""

    def __init__(self, reader: CalibrationDataReader, specs: list[InputSpec]) -> None:
        if not callable(getattr(reader, "get_next", None)):
            raise InvalidInputError(f"calibration data must be an .npz path or have get_next(), got {type(reader).__name__}")
        self._reader, self._specs, self._count = reader, specs, 0

    def get_next(self) -> Feed | None:
        feed = self._reader.get_next()
        if feed is None:
            return None
        self._count += 1
        if not isinstance(feed, Mapping):
            raise InvalidInputError(f"calibration reader: feed {self._count} is {type(feed).__name__}, not a dict")
        return check_feed(feed, self._specs, f"calibration reader feed {self._count}", samples=False)
