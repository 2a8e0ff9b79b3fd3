"""Run the original and the compressed model in onnxruntime on the same inputs and compare."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.graph.outputs import VALUES, output_kinds
from onnx_arsvd.io.arrays import available_memory
from onnx_arsvd.io.calls import DataInput, as_arrays, is_per_call, load_calls
from onnx_arsvd.io.data import Feed, load_labelled, load_labels, split_batches
from onnx_arsvd.io.models import load_model, to_model, weight_stats
from onnx_arsvd.measure.agreement import OutputAgreement, rows, scores
from onnx_arsvd.measure.inputs import generated_batches, unset_dims
from onnx_arsvd.measure.results import OutputComparison, TaskScores, VerificationReport
from onnx_arsvd.measure.sessions import make_session, run_session
from onnx_arsvd.numerics.padding import check_positions, masks, real_positions, sequence_outputs, zero_padding
from onnx_arsvd.progress import progress_bar

__all__ = [
    "ModelLike",
    "OutputComparison",
    "ReferenceOutputs",
    "TaskScores",
    "VerificationReport",
    "check_files",
    "compare_models",
    "compare_with_reference",
    "make_session",
    "model_source",
    "reference_outputs",
    "too_big_together",
    "verify",
]

ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model

logger = logging.getLogger("onnx_arsvd")

DEFAULT_BATCH_SIZE = 64
"""Samples per onnxruntime call in verification: bounds memory by one batch of both models' outputs."""


Outputs = list[np.ndarray]


def compare_models(
    original: ort.InferenceSession,
    compressed: ort.InferenceSession,
    batches: Iterable[Feed],
    *,
    labels: np.ndarray | None = None,
    inputs: str = "",
    progress: bool = False,
    total: int | None = None,
    kinds: Mapping[str, str] | None = None,
    per_call: bool = False,
    threshold: float | None = None,
) -> VerificationReport:
    """Run both sessions batch by batch (one at a time) and compare every output, in bounded memory; ``kinds``
    (:func:`~onnx_arsvd.graph.outputs.output_kinds`) says what each output is; ``per_call``: each batch is one
    call's feed (:mod:`onnx_arsvd.io.calls`), counted as one sample; ``threshold``: where a score per sample
    decides (default 0.5 for a probability, else 0).

    Outputs laid out batch x sequence x ... (and 2-D ones whose declared second dim is the mask's sequence dim)
    are compared at real token positions only when the feeds carry an attention mask
    (:mod:`onnx_arsvd.numerics.padding`); the report counts the padded positions left out.

    With ``labels``, the first output is read as class scores (argmax per sample) for accuracy and macro-F1.
    ``total`` samples, when known, give the progress bar its length.
    """
    names = [o.name for o in original.get_outputs()]
    _check_same_outputs(names, compressed)
    runs = ((feed, run_session(original, names, feed), run_session(compressed, names, feed)) for feed in batches)
    return _compare(names, _sequence(original), runs, original.get_providers()[0], labels=labels, inputs=inputs,
                    progress=progress, total=total, kinds=kinds, per_call=per_call, threshold=threshold)


def _sequence(session: ort.InferenceSession) -> list[bool]:
    """For each output, whether it is a 2-D batch x sequence output
    (:func:`~onnx_arsvd.numerics.padding.sequence_outputs`)."""
    return sequence_outputs(session.get_inputs(), session.get_outputs())


@dataclass(frozen=True)
class ReferenceOutputs:
    """The original model's outputs on a fixed list of batches, computed once: a search compares every
    candidate with them, without holding (or rerunning) a session of the original."""

    names: list[str]
    sequence: list[bool]
    provider: str
    outputs: list[Outputs]
    kinds: Mapping[str, str] | None = None
    per_call: bool = False
    """Whether each batch is one call's feed, counted as one sample."""
    threshold: float | None = None
    """Where a score per sample decides (None: 0.5 for a probability, else 0)."""

    @property
    def nbytes(self) -> int:
        return sum(np.asarray(output).nbytes for batch in self.outputs for output in batch)


def reference_outputs(original: ort.InferenceSession, batches: Sequence[Feed],
                      kinds: Mapping[str, str] | None = None, per_call: bool = False,
                      threshold: float | None = None) -> ReferenceOutputs:
    """Every output of ``original`` on each of ``batches`` (``kinds``: what each output is; ``per_call``: each
    batch is one call; ``threshold``: where a score decides)."""
    names = [o.name for o in original.get_outputs()]
    outputs = [run_session(original, names, feed) for feed in batches]
    return ReferenceOutputs(names, _sequence(original), original.get_providers()[0], outputs, kinds, per_call,
                            threshold)


def compare_with_reference(reference: ReferenceOutputs, compressed: ort.InferenceSession, batches: Sequence[Feed], *,
                           labels: np.ndarray | None = None) -> VerificationReport:
    """:func:`compare_models` against outputs computed once by :func:`reference_outputs` on the same ``batches``."""
    if len(batches) != len(reference.outputs):
        raise ValueError(f"{len(batches)} batches for reference outputs of {len(reference.outputs)}")
    _check_same_outputs(reference.names, compressed)
    runs = ((feed, expected, run_session(compressed, reference.names, feed))
            for feed, expected in zip(batches, reference.outputs, strict=True))
    return _compare(reference.names, reference.sequence, runs, reference.provider, labels=labels, inputs="",
                    progress=False, total=None, kinds=reference.kinds, per_call=reference.per_call,
                    threshold=reference.threshold)


def _check_same_outputs(names: list[str], compressed: ort.InferenceSession) -> None:
    if names != [o.name for o in compressed.get_outputs()]:
        raise UnsupportedModelError(f"the models have different outputs: {names} vs "
                                    f"{[o.name for o in compressed.get_outputs()]}")


def _compare(names: list[str], sequence: Sequence[bool], runs: Iterable[tuple[Feed, Outputs, Outputs]], provider: str,
             *, labels: np.ndarray | None, inputs: str, progress: bool, total: int | None,
             kinds: Mapping[str, str] | None = None, per_call: bool = False,
             threshold: float | None = None) -> VerificationReport:
    """The report over (feed, original's outputs, compressed model's outputs) for each batch; ``sequence`` flags the
    2-D outputs laid out batch x sequence; ``per_call``: a batch is one call, one sample."""
    agreements = {name: OutputAgreement(name, (kinds or {}).get(name, VALUES), threshold) for name in names}
    predictions: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    samples = padded = 0
    per_sample: list[np.ndarray] = []  # real positions compared in each sample, where padding was left out
    bar = progress_bar(total=total, desc="verification", unit="call" if per_call else "sample", progress=progress)
    for feed, expected, actual in runs:
        positions = real_positions(feed)
        for name, seq, e, a in zip(names, sequence, expected, actual, strict=True):
            real = positions if masks(np.asarray(e), positions, seq) else None
            original_output, compressed_output = (zero_padding(np.asarray(x), positions, seq) for x in (e, a))
            agreements[name].add(original_output, compressed_output, real)
        if positions is not None and any(masks(np.asarray(e), positions, seq)
                                         for e, seq in zip(expected, sequence, strict=True)):
            check_positions(positions, f"verification batch {len(per_sample) + 1}")
            padded += int(positions.size - positions.sum())
            per_sample.append(positions.sum(axis=1))
        if labels is not None:
            for kept, first in zip(predictions, (expected[0], actual[0]), strict=True):
                kept.append(rows(np.asarray(first)).argmax(axis=1))
        count = 1 if per_call or not feed else len(next(iter(feed.values())))
        samples += count
        bar.update(count)
    bar.close()
    counts = np.concatenate(per_sample) if per_sample else None
    original = compressed = None
    flipped = None
    if labels is not None:
        predicted_e, predicted_a = (np.concatenate(p) if p else np.zeros(0, np.int64) for p in predictions)
        labels = np.asarray(labels).reshape(-1)[: len(predicted_e)]
        if len(labels) != len(predicted_e):
            raise InvalidInputError(f"{len(labels)} labels for {len(predicted_e)} samples")
        original, compressed = scores(predicted_e, labels), scores(predicted_a, labels)
        flipped = int(np.sum((predicted_e == labels) != (predicted_a == labels)))
    return VerificationReport(provider=provider, inputs=inputs, samples=samples,
                              labelled=len(labels) if labels is not None else None, per_call=per_call,
                              outputs=[dataclasses.replace(agreement.result(), kind=(kinds or {}).get(name, VALUES))
                                       for name, agreement in agreements.items()],
                              original=original, compressed=compressed, flipped=flipped, padded_positions=padded,
                              compared_positions=None if counts is None else
                              (int(counts.sum()), int(counts.min()), int(counts.max())))


def too_big_together(*weight_bytes: int) -> bool:
    """Whether the models' weights together exceed half the memory available: then hold one session at a time."""
    return sum(weight_bytes) > available_memory() // 2


def _weight_bytes(source: ModelLike, model: ir.Model | None) -> int:
    if model is None:
        model = to_model(source)
    return weight_stats(model)[1]


def model_source(model: ModelLike) -> tuple[str | bytes | ir.Model, ir.Model | None]:
    """What :func:`~onnx_arsvd.measure.sessions.make_session` takes (a path, serialized bytes, or the IR itself),
    and the IR when it is at hand.

    A path is opened through :func:`load_model` first, so onnxruntime never reads a file that
    our checks (external data inside the model's folder, sizes) refuse. An IR model stays one, so that
    its external data is found from any working folder.
    """
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), load_model(model)
    if isinstance(model, ir.Model):
        return model, model
    return model.SerializeToString(), None


def check_files(**paths: object) -> None:
    """Fail before any work when a named input file is missing (data may be a folder: one file per call)."""
    for kind, path in paths.items():
        if isinstance(path, (str, os.PathLike)) and not Path(path).is_file() and not is_per_call(path):
            raise InvalidInputError(f"{os.fspath(path)}: no such {kind} file")


def verify(
    original: ModelLike,
    compressed: ModelLike,
    *,
    data: DataInput | None = None,
    labels: np.ndarray | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    samples: int = 16,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    provider: str = "CPUExecutionProvider",
    progress: bool = False,
    one_at_a_time: bool | None = None,
    score_threshold: float | None = None,
) -> VerificationReport:
    """Compare ``compressed`` with ``original`` in onnxruntime on ``data`` or generated inputs.

    ``data`` is an ``.npz`` path or a mapping of arrays keyed by input name (optional ``labels``), or data given
    one feed per call (a folder of ``.npz`` files, a ``CalibrationDataReader``, a list of mappings: see
    :mod:`onnx_arsvd.io.calls`), each call holding its own ``labels``.
    Both models run ``batch_size`` samples at a time and only per-sample summaries are kept, so
    memory is bounded by one batch's outputs, plus both models' weights (onnxruntime copies them
    into its own memory). ``one_at_a_time`` runs the original on every batch first, keeps its outputs,
    closes it, and only then opens the compressed model: memory then holds one model's weights and all of
    the original's outputs. ``None`` chooses it when both models' weights together exceed half the
    memory available. ``score_threshold``: where an output of one score per sample decides (default 0.5 for a
    probability, else 0).
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch size must be at least 1, got {batch_size}")
    check_files(data=data, labels=labels)
    original_source, original_ir = model_source(original)
    compressed_source, compressed_ir = model_source(compressed)
    if one_at_a_time is None:
        one_at_a_time = too_big_together(_weight_bytes(original, original_ir), _weight_bytes(compressed, compressed_ir))
    kinds_of = original_ir or (load_model(original) if isinstance(original, (str, os.PathLike)) else None)
    kinds = output_kinds(kinds_of) if kinds_of is not None else None
    session_a = make_session(original_source, provider)
    if not one_at_a_time:
        session_b = make_session(compressed_source, provider)
        _check_same_inputs(_inputs(session_a), session_b)
    per_call = data is not None and is_per_call(data)
    if per_call:
        calls = load_calls(data, labels, session_a)
        batches: Iterable[Feed] = calls.feeds
        total: int | None = len(calls)
        labels = calls.all_labels()
        described = f"{calls.where}, one feed per call"
    elif data is not None:
        arrays = as_arrays(data)
        feed, labels = load_labelled(arrays, labels, session_a)
        batches = split_batches(feed, session_a, batch_size)
        total = len(next(iter(feed.values()))) if feed else None
        described = "given arrays" if isinstance(arrays, Mapping) else os.fspath(arrays)
    else:
        if samples < 1:
            raise InvalidInputError(f"samples must be at least 1, got {samples}")
        ir_model = original_ir or (load_model(original) if isinstance(original, (str, os.PathLike)) else None)
        if unset := unset_dims(session_a, dims or {}):
            logger.warning(f"generated inputs set the dynamic dims {', '.join(f'{d}=1' for d in unset)}: give `dims` "
                           f"({unset[0]}=N) for the shapes the model really sees, or `data`")
        batches = generated_batches(session_a, ir_model, dims or {}, samples, seed)
        total = None
        labels = load_labels(labels) if labels is not None else None
        described = f"generated, seed {seed}" + (f", dims {dict(dims)}" if dims else "")
    if not one_at_a_time:
        return compare_models(session_a, session_b, batches, labels=labels, inputs=described, progress=progress,
                              total=total, kinds=kinds, per_call=per_call, threshold=score_threshold)
    names, sequence, inputs, provider_used = ([o.name for o in session_a.get_outputs()], _sequence(session_a),
                                              _inputs(session_a), session_a.get_providers()[0])
    feeds = list(batches)
    bar = progress_bar(feeds, desc="verification (original)", unit="batch", progress=progress)
    expected = [run_session(session_a, names, feed) for feed in bar]
    del session_a  # its weights go before the compressed model's come
    session_b = make_session(compressed_source, provider)
    _check_same_inputs(inputs, session_b)
    _check_same_outputs(names, session_b)
    runs = ((feed, outputs, run_session(session_b, names, feed)) for feed, outputs in zip(feeds, expected, strict=True))
    return _compare(names, sequence, runs, provider_used, labels=labels, inputs=described + "; one model at a time",
                    progress=progress, total=total, kinds=kinds, per_call=per_call, threshold=score_threshold)


def _inputs(session: ort.InferenceSession) -> list[str]:
    return [f"{arg.name}: {arg.type}" for arg in session.get_inputs()]


def _check_same_inputs(expected: list[str], compressed: ort.InferenceSession) -> None:
    """The two models must take the same inputs (names and types, as :func:`_inputs` lists them) to run on the same
    data."""
    if expected != _inputs(compressed):
        raise InvalidInputError(f"the models take different inputs: {', '.join(expected)} vs "
                                f"{', '.join(_inputs(compressed))}")
