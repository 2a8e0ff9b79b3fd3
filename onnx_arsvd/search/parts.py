"""The data a search works on: a seeded split into parts, each part's feeds, and the original's outputs on them.

The data is split once: a calibration part, which chooses, and a held-out part, never used to choose, on
which the result is reported. When the search fits factors to data (whitened factors' input Gram matrices,
sequential refits), the calibration part is split again: a fit part for those and a judge part for the
end-to-end checks, so no candidate is judged on the samples its factors were fitted to. Judged on its own
fit samples, a whitened candidate looks better than it is: the MiniLM 0.99 cosine budget was met on the
calibration part (bound 0.9901) and missed on the held-out part (0.9881).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.io.arrays import DataSource
from onnx_arsvd.io.calls import Calls, count
from onnx_arsvd.io.data import Feed, load_data, load_labels, sample_count, split_batches
from onnx_arsvd.measure.sessions import make_session, run_session
from onnx_arsvd.measure.verification import ModelLike, ReferenceOutputs, model_source, reference_outputs
from onnx_arsvd.methods.lowrank.settings import CalibrationSource
from onnx_arsvd.search.budget import Budget

__all__ = ["RESPONSE_VALUES", "DataParts", "Feeds", "Part", "feeds", "first_samples", "part_inputs", "part_labels",
           "response_batches", "split_data", "split_parts"]

RESPONSE_VALUES = 2**20
"""Output values each layer's end-to-end response is measured on: the first calibration samples whose outputs
hold that many (at least 32 samples; all of them when they hold fewer). A response is a ratio of sums over
every output value, so it needs values, not samples: an MLP's 10 logits per image use the whole calibration
part, MiniLM's 384 values per token 43 of its 120 sentences, whose responses are within 13% of the
120 sentences' (``benchmarks/results/response_samples.md``), in 0.56x the time. Candidates are still
judged on the whole calibration part."""

Arrays = dict[str, np.ndarray]
Part = Arrays | Calls
"""One part of the data: arrays with samples on the first axis (labels as their ``labels`` array), or calls."""


def part_labels(part: Part | None) -> np.ndarray | None:
    """The part's labels, in the order its samples run."""
    if part is None:
        return None
    return part.all_labels() if isinstance(part, Calls) else part.get("labels")


def part_inputs(part: Part) -> Arrays | Calls:
    """The part without its labels: the model's inputs."""
    if isinstance(part, Calls):
        return part.without_labels()
    return {name: array for name, array in part.items() if name != "labels"}


def split_data(arrays: Mapping[str, np.ndarray], holdout: float, seed: int) -> tuple[Arrays, Arrays]:
    """A seeded random split of every array along the first axis: (calibration, held-out)."""
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise InvalidInputError(f"data arrays have different sample counts {sorted(counts)}")
    (count,) = counts
    held = max(1, round(holdout * count))
    if count - held < 1:
        raise InvalidInputError(f"{count} samples are too few to split into calibration and held-out parts")
    order = np.random.default_rng(seed).permutation(count)
    calibration, held_out = np.sort(order[held:]), np.sort(order[:held])
    return ({k: a[calibration] for k, a in arrays.items()}, {k: a[held_out] for k, a in arrays.items()})


def first_samples(batches: Sequence[Feed], count: int, per_call: bool = False) -> list[Feed]:
    """The batches cut to their first ``count`` samples in all (the whole batches when they hold fewer); with
    ``per_call`` each batch is one call, one sample."""
    if per_call:
        return list(batches[:max(count, 1)])
    kept: list[Feed] = []
    for feed in batches:
        rows = sample_count(feed)
        if count <= 0 or not rows:
            break
        kept.append({name: array[:count] for name, array in feed.items()})
        count -= rows
    return kept


def response_batches(session: ort.InferenceSession, batches: Sequence[Feed], values: int = RESPONSE_VALUES,
                     least: int = 32, per_call: bool = False) -> list[Feed]:
    """The first calibration samples (or calls) whose outputs hold ``values`` values (at least ``least``)."""
    if not batches or not batches[0]:
        return list(batches)
    one = batches[0] if per_call else {name: array[:1] for name, array in batches[0].items()}
    per_sample = max(1, sum(np.asarray(output).size for output in run_session(session, None, one)))
    return first_samples(batches, max(least, math.ceil(values / per_sample)), per_call)


@dataclass(frozen=True)
class DataParts:
    """The split data: the calibration part (judges; with ``labels`` when the budget scores them), the fit part
    (fits factors; empty when the calibration part does both), the held-out part, and what fits the factors
    (``calibration``: the caller's calibration inputs, else the fit part, else the calibration part)."""

    calibration_part: Part
    fit_part: Part
    held_out: Part | None
    calibration: CalibrationSource | None
    notes: tuple[str, ...] = ()

    @property
    def per_call(self) -> bool:
        """Whether the data is given one feed per call (each call then counts as one sample)."""
        return isinstance(self.calibration_part, Calls)

    @property
    def held_samples(self) -> int:
        return count(self.held_out) if self.held_out is not None else 0

    def samples(self) -> dict[str, int]:
        """Samples (or calls) in each part, as the report shows them."""
        return {"calibration": count(self.calibration_part), "fit": count(self.fit_part),
                "held_out": self.held_samples}


def split_parts(budget: Budget, model: ir.Model, data: DataSource | Calls | None,
                labels: np.ndarray | str | os.PathLike | None, method: str,
                calibration: CalibrationSource | None) -> DataParts:
    """The data checked against ``model`` and split for ``budget``; ``labels`` are those to judge with, as the caller
    resolved them (a ``labels`` array in ``data`` is not read). Per-call data (:class:`Calls`, checked already) is
    split by call and keeps its calls' own labels."""
    if budget.needs_data and data is None:
        what = "inputs and labels" if budget.max_drop is not None else "inputs"
        raise InvalidInputError(f"this budget needs `data`: {what} to split and measure candidates on")
    calibration_part: Part = {}
    held_out: Part | None = None
    if isinstance(data, Calls):
        if budget.max_drop is not None and data.labels is None:
            raise InvalidInputError("`max_drop` needs labels: a 'labels' array in every call")
        calibration_part, held_out = data.split(budget.holdout, budget.seed)
    elif data is not None:  # a parameter budget uses data too: to calibrate, and to verify on the held-out part
        arrays = load_data(data, model)[0]  # checked: per-call inputs repeated for each sample, so every array
        if labels is not None:  # is split alike
            arrays["labels"] = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
        if budget.max_drop is not None and "labels" not in arrays:
            raise InvalidInputError("`max_drop` needs labels: a 'labels' array in `data`, or `labels`")
        calibration_part, held_out = split_data(arrays, budget.holdout, budget.seed)
    if method == "whitened" and calibration is None and not calibration_part:
        raise InvalidInputError("the whitened method needs calibration inputs (calibration data, or the budget's data)")
    fit_part: Part = {}
    notes: list[str] = []
    if calibration_part and ((method == "whitened" and calibration is None) or budget.sequential):
        if count(calibration_part) < 2:
            notes.append("too few calibration samples to fit and judge on different ones: "
                         "the calibration bound is optimistic")
        elif isinstance(calibration_part, Calls):
            fit_calls, calibration_part = calibration_part.split(1.0 - budget.fit_share, budget.seed + 1)
            fit_part = fit_calls.without_labels()
        else:
            fit, calibration_part = split_data(calibration_part, 1.0 - budget.fit_share, budget.seed + 1)
            fit_part = part_inputs(fit)
    source = calibration if calibration is not None else (fit_part or calibration_part or None)
    return DataParts(calibration_part, fit_part, held_out, source, tuple(notes))


@dataclass(frozen=True)
class Feeds:
    """The parts as the model's feeds (batches of the verification's size) and the original's outputs on them,
    all computed once from one session of the original: so no session of the original stays open through the
    search (it held onnxruntime's copy of every weight), and the original does not run again per candidate."""

    judge: list[Feed]
    fit: list[Feed]
    judge_reference: ReferenceOutputs | None = None
    response: list[Feed] | None = None
    response_reference: ReferenceOutputs | None = None
    held: list[Feed] | None = None
    held_reference: ReferenceOutputs | None = None
    per_call: bool = False
    """Whether each feed is one call (:mod:`onnx_arsvd.io.calls`), counted as one sample."""


def feeds(model: ModelLike, parts: DataParts, batch_size: int, *, judge: bool, responses: bool,
          held_out: bool, kinds: Mapping[str, str], threshold: float | None = None) -> Feeds:
    """The parts' feeds; the original's outputs on the judge part (``judge``), on the samples the layer responses
    run on (``responses``) and on the held-out part (``held_out``), each output read as ``kinds``
    (:func:`~onnx_arsvd.graph.outputs.output_kinds` of the model) says, a score per sample deciding at
    ``threshold``."""
    original = make_session(model_source(model)[0])

    per_call = parts.per_call

    def batches(part: Part) -> list[Feed]:
        inputs = part_inputs(part)
        if isinstance(inputs, Calls):
            return list(inputs.feeds)
        return list(split_batches(load_data(inputs, original)[0], original, batch_size))

    def outputs(part: list[Feed] | None) -> ReferenceOutputs | None:
        return reference_outputs(original, part, kinds, per_call, threshold) if part is not None else None

    judged = batches(parts.calibration_part)
    fit = batches(parts.fit_part) if parts.fit_part else judged
    response = response_batches(original, judged, per_call=per_call) if responses else None
    held = batches(parts.held_out) if held_out and parts.held_out is not None else None
    return Feeds(judged, fit, judge_reference=outputs(judged) if judge else None, response=response,
                 response_reference=outputs(response), held=held, held_reference=outputs(held), per_call=per_call)
