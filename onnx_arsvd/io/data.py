"""The one place that loads and validates data: ``.npz`` files, arrays, labels and calibration readers.

Arrays are keyed by graph input name with samples on the first axis. Before any work each array
is checked against the model's input: present, of a castable dtype, of the input's rank, with its
fixed dims, at least one sample, all inputs with the same sample count, and finite. An input of a fixed
shape that takes one value per call (a flag, a threshold) may be given once, in that shape, beside inputs
that hold samples: it is repeated for every sample (a broadcast view, no copy) so that every slice of the
feed carries it, and :func:`one_call` gives the session that one value back. Labels are
1-D integers, one per sample, and only for a first output that can be argmaxed into classes: one
score vector per sample, (samples, classes) or with fixed extra axes. A data file's own ``labels``
array that the first output cannot take (a sentence-embedding model's token states, batch x sequence
x hidden, scored against sentence labels) is left out with a warning, so no meaningless accuracy is
reported or budgeted; labels given apart are an error then.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.io.arrays import DataSource, open_arrays
from onnx_arsvd.numerics.padding import check_positions, real_positions

logger = logging.getLogger("onnx_arsvd")

__all__ = [
    "ArrayReader",
    "CalibrationDataReader",
    "CheckedReader",
    "Feed",
    "InputSpec",
    "Session",
    "check_feed",
    "check_labels",
    "input_specs",
    "label_problem",
    "load_data",
    "load_labelled",
    "load_labels",
    "one_call",
    "sample_count",
    "split_batches",
]

Feed = dict[str, np.ndarray]


def sample_count(feed: Mapping[str, np.ndarray]) -> int:
    """Samples in a feed (the first axis of its arrays, which checked feeds share); 0 for no arrays."""
    return len(next(iter(feed.values()))) if feed else 0


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


class Session(Protocol):
    """What of an onnxruntime session describes its inputs."""

    def get_inputs(self) -> list: ...

    def get_outputs(self) -> list: ...


_ORT_TYPES = {"float": "float32", "double": "float64", "bool": "bool"}


def _session_specs(session: Session) -> list[InputSpec]:
    specs = []
    for arg in session.get_inputs():
        name = arg.type.removeprefix("tensor(").removesuffix(")")
        try:
            dtype = np.dtype(_ORT_TYPES.get(name, name))
        except TypeError as error:
            raise UnsupportedModelError(f"input {arg.name!r} has unsupported type {arg.type}") from error
        shape = None if arg.shape is None else tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
        specs.append(InputSpec(arg.name, dtype, shape))
    return specs


def input_specs(model: ir.Model | Session) -> list[InputSpec]:
    """The inputs a feed must hold: graph inputs that are not initializers (IR 3 lists those too).

    ``model`` is an ``onnx_ir.Model`` or an onnxruntime session.
    """
    if not isinstance(model, ir.Model):
        return _session_specs(model)
    specs = []
    for value in model.graph.inputs:
        if value.name in model.graph.initializers:
            continue
        if value.dtype is None:
            raise UnsupportedModelError(f"input {value.name!r} has no tensor type")
        try:
            dtype = np.dtype(value.dtype.numpy())
        except (TypeError, ValueError) as error:
            raise UnsupportedModelError(f"input {value.name!r} has unsupported type {value.dtype}") from error
        shape = None if value.shape is None else tuple(d if isinstance(d, int) else None for d in value.shape)
        specs.append(InputSpec(value.name or "", dtype, shape))
    return specs


def _check_array(array: np.ndarray, spec: InputSpec, where: str, samples: bool) -> np.ndarray:
    """``array`` cast to the input's dtype; with ``samples`` its first axis counts samples (a batch dim)."""
    expected = f"input {spec.name!r} expects {spec.describe()}" + (" with samples on the first axis" if samples else "")
    rank = None if spec.shape is None else len(spec.shape)
    if samples and rank == 0:
        raise InvalidInputError(f"{where}: input {spec.name!r} is a scalar: arrays cannot hold samples of it "
                                "(feed it with a CalibrationDataReader)")
    if array.ndim == 0 and rank != 0:
        raise InvalidInputError(f"{where}: array {spec.name!r} is 0-d; {expected}")
    if array.dtype.kind not in "biuf" or not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
        raise InvalidInputError(f"{where}: array {spec.name!r} is {array.dtype}; {expected}")
    if spec.shape is not None:
        checked = [(i, d) for i, d in enumerate(spec.shape) if d is not None and (i > 0 or not samples)]
        first = spec.shape[0] if spec.shape and samples else None
        if (array.ndim != len(spec.shape) or any(array.shape[i] != d for i, d in checked)
                or (first is not None and len(array) < first)):
            raise InvalidInputError(f"{where}: array {spec.name!r} has shape {array.shape}; {expected}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
        raise InvalidInputError(f"{where}: array {spec.name!r} holds NaN or Inf values")
    return array.astype(spec.dtype, copy=False)


def _fixed(spec: InputSpec) -> bool:
    return spec.shape is not None and None not in spec.shape


def _once(array: np.ndarray, spec: InputSpec) -> bool:
    """Whether ``array`` is one value of a fixed-shape input (its exact shape), not samples of it."""
    return _fixed(spec) and array.shape == spec.shape


def _repeated(array: np.ndarray, spec: InputSpec) -> bool:
    """Whether ``array`` is one value of a fixed-shape input repeated for each sample (one axis more)."""
    return _fixed(spec) and array.ndim == len(spec.shape or ()) + 1 and array.shape[1:] == spec.shape


def check_feed(arrays: Mapping[str, np.ndarray], specs: list[InputSpec], where: str, *, samples: bool = True) -> Feed:
    """The arrays the model's inputs need, checked and cast; ``samples`` also demands one common count.

    With ``samples``, a fixed-shape input given once beside inputs that hold samples is repeated for each
    sample (see the module's docstring); given per sample, its values must be one value repeated.
    """
    given: dict[str, np.ndarray] = {}
    for spec in specs:
        if spec.name not in arrays:
            raise InvalidInputError(f"{where}: no array for model input {spec.name!r} "
                                    f"(has: {', '.join(arrays) or 'nothing'})")
        given[spec.name] = np.asarray(arrays[spec.name])
    once = {s.name for s in specs if samples and _once(given[s.name], s)}
    repeated = {s.name for s in specs if samples and _repeated(given[s.name], s)}
    if once | repeated == set(given):  # nothing else holds samples: every array is samples (a fixed batch dim)
        once, repeated = set(), set()
    feed: Feed = {}
    for spec in specs:
        array = given[spec.name]
        if spec.name in repeated:
            if len(array):  # the one value's dtype and finiteness; then that every sample repeats it
                _check_array(array[0, ...], spec, where, samples=False)
                if not np.all(array == array[:1]):
                    raise InvalidInputError(f"{where}: input {spec.name!r} takes one value per call, "
                                            f"{spec.describe()}; the data gives it different values per sample")
            feed[spec.name] = array.astype(spec.dtype, copy=False)
        else:
            feed[spec.name] = _check_array(array, spec, where, samples and spec.name not in once)
    if samples and feed:
        counts = {len(a) for name, a in feed.items() if name not in once}
        if len(counts) != 1:
            raise InvalidInputError(f"{where}: input arrays have different sample counts {sorted(counts)}")
        if counts == {0}:
            raise InvalidInputError(f"{where}: the arrays hold no sample")
        for name in once:
            feed[name] = np.broadcast_to(feed[name], (*counts, *feed[name].shape))
    if (positions := real_positions(feed)) is not None:
        check_positions(positions, where)
    return feed


def one_call(feed: Mapping[str, np.ndarray], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """The feed as one session call takes it: an input of a fixed shape repeated for each sample by
    :func:`check_feed` (one axis more than its shape) back to its one value."""
    repeated = {s.name for s in specs if s.name in feed and _repeated(np.asarray(feed[s.name]), s)}
    return {name: (array[0, ...] if name in repeated else array) for name, array in feed.items()}


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


def _first_output(model: ir.Model | Session) -> tuple[str, bool | None, tuple[int | None, ...] | None]:
    """Name, whether it is a float tensor (None: unknown), and dims of the first output."""
    if isinstance(model, ir.Model):
        output = model.graph.outputs[0]
        is_float = output.dtype.is_floating_point() if output.dtype is not None else None
        shape = None if output.shape is None else tuple(d if isinstance(d, int) else None for d in output.shape)
        return output.name or "", is_float, shape
    arg = model.get_outputs()[0]
    shape = None if arg.shape is None else tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    return arg.name, arg.type in ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)"), shape


def _classes(model: ir.Model | Session) -> int | None:
    """How many classes the first output's argmax picks from (None if not known); error if it cannot."""
    name, is_float, shape = _first_output(model)
    if is_float is False:
        raise InvalidInputError(f"labels need a float first output to argmax; {name!r} is not one")
    if shape is None:
        return None
    if len(shape) < 2:
        raise InvalidInputError(f"labels need a first output of shape (samples, classes); {name!r} has rank "
                                f"{len(shape)}")
    known = [d for d in shape[1:] if d is not None]
    if len(shape) > 2 and len(known) < len(shape) - 1:
        dims = ", ".join("?" if d is None else str(d) for d in shape)
        raise InvalidInputError(f"labels need a first output of class scores, (samples, classes); {name!r} has "
                                f"shape ({dims}), more than one axis per sample and not all fixed")
    if len(known) == len(shape) - 1:
        classes = math.prod(known)
        if classes < 2:
            raise InvalidInputError(f"labels need at least 2 classes; output {name!r} has {classes}")
        return classes
    return None


def label_problem(model: ir.Model | Session) -> str:
    """Why the model's first output cannot be scored against labels, or "" when it can."""
    try:
        _classes(model)
    except InvalidInputError as error:
        return str(error)
    return ""


def check_labels(labels: np.ndarray, samples: int, model: ir.Model | Session, where: str = "labels") -> np.ndarray:
    """1-D integer labels, one per sample, in range of the first output's classes."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InvalidInputError(f"{where}: labels must be a 1-D integer array, got {labels.dtype} of shape "
                                f"{labels.shape}")
    if len(labels) != samples:
        raise InvalidInputError(f"{where}: {len(labels)} labels for {samples} samples")
    classes = _classes(model)
    if len(labels) and (labels.min() < 0 or (classes is not None and labels.max() >= classes)):
        raise InvalidInputError(f"{where}: labels must lie in [0, {classes if classes is not None else 'classes'})")
    return labels


def load_data(data: DataSource, model: ir.Model | Session) -> tuple[Feed, np.ndarray | None]:
    """The checked feed for ``model``'s inputs and the optional ``labels`` array (not yet checked); no other
    array of the data is read."""
    where = "data" if isinstance(data, Mapping) else os.fspath(data)
    with open_arrays(data) as arrays:
        return check_feed(arrays, input_specs(model), where), arrays.get("labels")


def load_labelled(data: DataSource, labels: np.ndarray | str | os.PathLike | None,
                  model: ir.Model | Session, *, warn: bool = True) -> tuple[Feed, np.ndarray | None]:
    """The checked feed and its checked labels: ``labels`` when given (an array or ``.npy`` path), else
    the data's own ``labels`` array (left out, with a warning unless ``warn`` is false, when the first output
    cannot take labels), else None."""
    feed, own = load_data(data, model)
    if labels is None and own is not None and (problem := label_problem(model)):
        where = "the data" if isinstance(data, Mapping) else os.fspath(data)
        if warn:
            logger.warning(f"{where}: its 'labels' array is left out: {problem}")
        own = None
    given = load_labels(labels) if labels is not None else own
    if given is None:
        return feed, None
    return feed, check_labels(given, sample_count(feed), model)


def split_batches(feed: Feed, model: ir.Model | Session | list[InputSpec], batch_size: int) -> Iterator[Feed]:
    """Slices of the data along the first axis; a fixed batch dim in the model sets the slice size."""
    specs = model if isinstance(model, list) else input_specs(model)
    fixed = next((s.shape[0] for s in specs if s.shape and s.shape[0] and s.name in feed
                  and not _repeated(feed[s.name], s)), None)
    step = fixed or batch_size
    total = sample_count(feed)
    stop = total - total % step if fixed else total
    for start in range(0, stop, step):
        yield {name: array[start : start + step] for name, array in feed.items()}


class ArrayReader:
    """A ``CalibrationDataReader`` over an ``.npz`` or a mapping of arrays, in batches of ``batch_size``."""

    def __init__(self, data: DataSource, model: ir.Model | Session | list[InputSpec], batch_size: int = 256,
                 what: str = "calibration") -> None:
        where = "calibration arrays" if isinstance(data, Mapping) else os.fspath(data)
        specs = model if isinstance(model, list) else input_specs(model)
        with open_arrays(data, what) as arrays:
            feed = check_feed(arrays, specs, where)
        self._batches: Iterator[Feed] = split_batches(feed, specs, batch_size)

    def get_next(self) -> Feed | None:
        return next(self._batches, None)


class CheckedReader:
    """A user's ``CalibrationDataReader`` whose every feed is checked like an array file's."""

    def __init__(self, reader: CalibrationDataReader, model: ir.Model | Session | list[InputSpec]) -> None:
        if not callable(getattr(reader, "get_next", None)):
            raise InvalidInputError("calibration data must be an .npz path or have get_next(), got "
                                    f"{type(reader).__name__}")
        self._reader, self._count = reader, 0
        self._specs = model if isinstance(model, list) else input_specs(model)

    def get_next(self) -> Feed | None:
        feed = self._reader.get_next()
        if feed is None:
            return None
        self._count += 1
        if not isinstance(feed, Mapping):
            raise InvalidInputError(f"calibration reader: feed {self._count} is {type(feed).__name__}, not a dict")
        return check_feed(feed, self._specs, f"calibration reader feed {self._count}", samples=False)
