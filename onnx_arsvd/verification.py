"""Run the original and the compressed model in onnxruntime on the same inputs and compare."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.candidates import constant_tensor
from onnx_arsvd.data import Feed, check_labels, load_data, load_labels, split_batches
from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.model_io import load_model
from onnx_arsvd.results import OutputComparison, TaskScores, VerificationReport
from onnx_arsvd.sessions import make_session, run_session

__all__ = [
    "ModelLike",
    "OutputComparison",
    "TaskScores",
    "VerificationReport",
    "check_dims",
    "check_files",
    "compare_models",
    "generated_batches",
    "macro_f1",
    "make_session",
    "model_source",
    "verify",
]

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model


def _input_dtype(node_arg: ort.NodeArg) -> np.dtype:
    type_name = node_arg.type.removeprefix("tensor(").removesuffix(")")
    aliases = {"float": "float32", "double": "float64", "bool": "bool_"}
    try:
        return np.dtype(aliases.get(type_name, type_name))
    except TypeError:
        raise UnsupportedModelError(f"input {node_arg.name!r} has unsupported type {node_arg.type}") from None


def _index_bounds(model: ir.Model) -> dict[str, int]:
    """For integer inputs that index an embedding table (Gather on a constant), the table's size."""
    bounds: dict[str, int] = {}
    for value in model.graph.inputs:
        for user, index in value.uses():
            if user.op_type == "Gather" and index == 1 and constant_tensor(user.inputs[0]) is not None:
                axis = user.attributes.get("axis")
                size = int(constant_tensor(user.inputs[0]).shape[axis.value if axis else 0])
                bounds[value.name] = min(size, bounds.get(value.name, size))
    return bounds


def check_dims(dynamic: set[str], dims: Mapping[str, int]) -> None:
    """Every name in ``dims`` must be one of the model's dynamic input dimensions."""
    unknown = sorted(set(dims) - dynamic)
    if unknown:
        raise InvalidInputError(f"--dim {', '.join(unknown)}: no dynamic dimension of that name; the model's are: "
                                f"{', '.join(sorted(dynamic)) or 'none'}")


def generated_batches(
    session: ort.InferenceSession,
    model: ir.Model | None,
    dims: Mapping[str, int],
    samples: int,
    seed: int = 0,
) -> list[Feed]:
    """``samples`` random feeds built from the input types and shapes; dynamic dims from ``dims`` (default 1).

    Floats are standard normal; inputs named like ``*mask*`` are all ones (a random 0/1 mask has holes
    that fused attention kernels, which read it as sequence lengths, do not support); other integers
    index validly into the embedding table they feed, else are 0 or 1.
    """
    check_dims({str(d) for arg in session.get_inputs() for d in arg.shape if not (isinstance(d, int) and d >= 0)}, dims)
    rng = np.random.default_rng(seed)
    bounds = _index_bounds(model) if model is not None else {}
    batches: list[Feed] = []
    for _ in range(samples):
        feed: Feed = {}
        for node_arg in session.get_inputs():
            shape = [d if isinstance(d, int) and d >= 0 else dims.get(str(d), 1) for d in node_arg.shape]
            dtype = _input_dtype(node_arg)
            if np.issubdtype(dtype, np.floating):
                feed[node_arg.name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feed[node_arg.name] = rng.integers(0, 2, shape).astype(bool)
            elif "mask" in node_arg.name.lower():  # attention masks: fused attention assumes right padding
                feed[node_arg.name] = np.ones(shape, dtype)
            elif np.issubdtype(dtype, np.integer):
                feed[node_arg.name] = rng.integers(0, bounds.get(node_arg.name, 2), shape).astype(dtype)
            else:
                raise UnsupportedModelError(f"cannot generate inputs of type {dtype} for {node_arg.name!r}; pass --data")
        batches.append(feed)
    return batches


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over every class seen in labels or predictions."""
    scores = []
    for cls in np.union1d(labels, predictions):
        tp = np.sum((predictions == cls) & (labels == cls))
        wrong = np.sum((predictions == cls) != (labels == cls))
        scores.append(2 * tp / (2 * tp + wrong) if (2 * tp + wrong) else 0.0)
    return float(np.mean(scores))


def _scores(logits: np.ndarray, labels: np.ndarray) -> TaskScores:
    predictions = logits.reshape(len(labels), -1).argmax(axis=1)
    return TaskScores(accuracy=float(np.mean(predictions == labels)), macro_f1=macro_f1(labels, predictions))


def _compare(name: str, expected: list[np.ndarray], actual: list[np.ndarray]) -> OutputComparison:
    rows_e = np.concatenate([e.reshape(e.shape[0] if e.ndim > 1 else 1, -1) for e in expected]).astype(np.float64)
    rows_a = np.concatenate([a.reshape(a.shape[0] if a.ndim > 1 else 1, -1) for a in actual]).astype(np.float64)
    diff = rows_a - rows_e
    norm_e = np.linalg.norm(rows_e)
    dots = np.sum(rows_e * rows_a, axis=1)
    norms = np.linalg.norm(rows_e, axis=1) * np.linalg.norm(rows_a, axis=1)
    cosines = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(np.any(diff != 0, axis=1), 0.0, 1.0))
    newly_nonfinite = int(np.sum(np.all(np.isfinite(rows_e), axis=1) & ~np.all(np.isfinite(rows_a), axis=1)))
    return OutputComparison(
        name=name,
        max_abs_error=float(np.max(np.abs(diff))) if diff.size else 0.0,
        relative_error=float(np.linalg.norm(diff) / norm_e) if norm_e > 0 else float(np.linalg.norm(diff)),
        mean_cosine=float(np.mean(cosines)),
        min_cosine=float(np.min(cosines)),
        cosine_stderr=float(np.std(cosines, ddof=1) / np.sqrt(len(cosines))) if len(cosines) > 1 else 0.0,
        newly_nonfinite=newly_nonfinite,
    )


def compare_models(
    original: ort.InferenceSession,
    compressed: ort.InferenceSession,
    batches: Sequence[Feed],
    *,
    labels: np.ndarray | None = None,
    inputs: str = "",
) -> VerificationReport:
    """Run both sessions batch by batch (one at a time) and compare every output."""
    names = [o.name for o in original.get_outputs()]
    if names != [o.name for o in compressed.get_outputs()]:
        raise UnsupportedModelError(f"the models have different outputs: {names} vs {[o.name for o in compressed.get_outputs()]}")
    expected: dict[str, list[np.ndarray]] = {n: [] for n in names}
    actual: dict[str, list[np.ndarray]] = {n: [] for n in names}
    samples = 0
    for feed in batches:
        for name, value in zip(names, run_session(original, names, feed)):
            expected[name].append(np.asarray(value))
        for name, value in zip(names, run_session(compressed, names, feed)):
            actual[name].append(np.asarray(value))
        samples += len(next(iter(feed.values()))) if feed else 1
    report = VerificationReport(
        provider=original.get_providers()[0],
        inputs=inputs,
        samples=samples,
        outputs=[_compare(n, expected[n], actual[n]) for n in names],
    )
    if labels is not None:
        first = names[0]
        logits_e, logits_a = np.concatenate(expected[first]), np.concatenate(actual[first])
        labels = np.asarray(labels).reshape(-1)[: len(logits_e)]
        if len(labels) != len(logits_e):
            raise InvalidInputError(f"{len(labels)} labels for {len(logits_e)} samples")
        report.original, report.compressed = _scores(logits_e, labels), _scores(logits_a, labels)
        right_e = logits_e.reshape(len(labels), -1).argmax(axis=1) == labels
        right_a = logits_a.reshape(len(labels), -1).argmax(axis=1) == labels
        report.flipped = int(np.sum(right_e != right_a))
    return report


def model_source(model: ModelLike) -> tuple[str | bytes, ir.Model | None]:
    """What onnxruntime loads (a path, or serialized bytes), and the IR when it is at hand."""
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise InvalidInputError(f"{os.fspath(model)}: no such file")
        return os.fspath(model), None
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    return proto.SerializeToString(), model if isinstance(model, ir.Model) else None


def check_files(**paths: object) -> None:
    """Fail before any work when a named input file is missing."""
    for kind, path in paths.items():
        if isinstance(path, (str, os.PathLike)) and not Path(path).is_file():
            raise InvalidInputError(f"{os.fspath(path)}: no such {kind} file")


def verify(
    original: ModelLike,
    compressed: ModelLike,
    *,
    data: str | os.PathLike | Mapping[str, np.ndarray] | None = None,
    labels: np.ndarray | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    samples: int = 16,
    batch_size: int = 256,
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
) -> VerificationReport:
    """Compare ``compressed`` with ``original`` in onnxruntime on ``data`` or generated inputs.

    ``data`` is an ``.npz`` path or a mapping of arrays keyed by input name (optional ``labels``).
    """
    check_files(data=data, labels=labels)
    original_source, original_ir = model_source(original)
    compressed_source, _ = model_source(compressed)
    session_a = make_session(original_source, provider)
    session_b = make_session(compressed_source, provider)
    _check_same_inputs(session_a, session_b)
    if isinstance(labels, (str, os.PathLike)):
        labels = load_labels(labels)
    if data is not None:
        feed, data_labels = load_data(data, session_a)
        if labels is not None or data_labels is not None:
            labels = check_labels(labels if labels is not None else data_labels, len(next(iter(feed.values()))),
                                  session_a)
        batches = list(split_batches(feed, session_a, batch_size))
        described = "given arrays" if isinstance(data, Mapping) else os.fspath(data)
    else:
        if samples < 1:
            raise InvalidInputError(f"samples must be at least 1, got {samples}")
        ir_model = original_ir or (load_model(original) if isinstance(original, (str, os.PathLike)) else None)
        batches = generated_batches(session_a, ir_model, dims or {}, samples, seed)
        data_labels = None
        described = f"generated, seed {seed}" + (f", dims {dict(dims)}" if dims else "")
    return compare_models(session_a, session_b, batches, labels=labels if labels is not None else data_labels,
                          inputs=described)


def _check_same_inputs(original: ort.InferenceSession, compressed: ort.InferenceSession) -> None:
    """The two models must take the same inputs (names and types) to be run on the same data."""
    described = [[f"{arg.name}: {arg.type}" for arg in session.get_inputs()] for session in (original, compressed)]
    if described[0] != described[1]:
        raise InvalidInputError(f"the models take different inputs: {', '.join(described[0])} vs "
                                f"{', '.join(described[1])}")
