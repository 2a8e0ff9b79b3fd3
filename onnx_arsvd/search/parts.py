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
from onnx_arsvd.graph.outputs import output_kinds
from onnx_arsvd.io.data import Feed, load_data, load_labels, sample_count, split_batches
from onnx_arsvd.measure.sessions import make_session, run_session
from onnx_arsvd.measure.verification import ModelLike, ReferenceOutputs, model_source, reference_outputs
from onnx_arsvd.methods.lowrank.settings import CalibrationSource
from onnx_arsvd.search.budget import Budget

__all__ = ["RESPONSE_VALUES", "DataParts", "Feeds", "feeds", "first_samples", "response_batches", "split_data",
           "split_parts"]

RESPONSE_VALUES = 2**20
"""Output values each layer's end-to-end response is measured on: the first calibration samples whose outputs
hold that many (at least 32 samples; all of them when they hold fewer). A response is a ratio of sums over
every output value, so it needs values, not samples: an MLP's 10 logits per image use the whole calibration
part, MiniLM's 384 values per token 43 of its 120 sentences, whose responses are within 13% of the
120 sentences' (``benchmarks/results/response_samples.md``), in 0.56x the time. Candidates are still
judged on the whole calibration part."""

Arrays = dict[str, np.ndarray]


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


def first_samples(batches: Sequence[Feed], count: int) -> list[Feed]:
    """The batches cut to their first ``count`` samples in all (the whole batches when they hold fewer)."""
    kept: list[Feed] = []
    for feed in batches:
        rows = sample_count(feed)
        if count <= 0 or not rows:
            break
        kept.append({name: array[:count] for name, array in feed.items()})
        count -= rows
    return kept


def response_batches(session: ort.InferenceSession, batches: Sequence[Feed], values: int = RESPONSE_VALUES,
                     least: int = 32) -> list[Feed]:
    """The first calibration samples whose outputs hold ``values`` values (at least ``least`` samples)."""
    if not batches or not batches[0]:
        return list(batches)
    one = {name: array[:1] for name, array in batches[0].items()}
    per_sample = max(1, sum(np.asarray(output).size for output in run_session(session, None, one)))
    return first_samples(batches, max(least, math.ceil(values / per_sample)))


@dataclass(frozen=True)
class DataParts:
    """The split data: the calibration part (judges; with ``labels`` when the budget scores them), the fit part
    (fits factors; empty when the calibration part does both), the held-out part, and what fits the factors
    (``calibration``: the caller's calibration inputs, else the fit part, else the calibration part)."""

    calibration_part: Arrays
    fit_part: Arrays
    held_out: Arrays | None
    calibration: CalibrationSource | None
    notes: tuple[str, ...] = ()

    @property
    def held_samples(self) -> int:
        return sample_count(self.held_out or {})

    def samples(self) -> dict[str, int]:
        """Samples in each part, as the report shows them."""
        return {"calibration": sample_count(self.calibration_part), "fit": sample_count(self.fit_part),
                "held_out": self.held_samples}


def split_parts(budget: Budget, model: ir.Model, data: str | os.PathLike | Mapping[str, np.ndarray] | None,
                labels: np.ndarray | str | os.PathLike | None, method: str,
                calibration: CalibrationSource | None) -> DataParts:
    """The data checked against ``model`` and split for ``budget``; ``labels`` are those to judge with, as the caller
    resolved them (a ``labels`` array in ``data`` is not read)."""
    if budget.needs_data and data is None:
        what = "inputs and labels" if budget.max_drop is not None else "inputs"
        raise InvalidInputError(f"this budget needs `data`: {what} to split and measure candidates on")
    calibration_part: Arrays = {}
    held_out: Arrays | None = None
    if data is not None:  # a parameter budget uses data too: to calibrate, and to verify on the held-out part
        arrays = load_data(data, model)[0]  # checked: per-call inputs repeated for each sample, so every array
        if labels is not None:  # is split alike
            arrays["labels"] = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
        if budget.max_drop is not None and "labels" not in arrays:
            raise InvalidInputError("`max_drop` needs labels: a 'labels' array in `data`, or `labels`")
        calibration_part, held_out = split_data(arrays, budget.holdout, budget.seed)
    if method == "whitened" and calibration is None and not calibration_part:
        raise InvalidInputError("the whitened method needs calibration inputs (calibration data, or the budget's data)")
    fit_part: Arrays = {}
    notes: list[str] = []
    if calibration_part and ((method == "whitened" and calibration is None) or budget.sequential):
        if sample_count(calibration_part) < 2:
            notes.append("too few calibration samples to fit and judge on different ones: "
                         "the calibration bound is optimistic")
        else:
            fit, calibration_part = split_data(calibration_part, 1.0 - budget.fit_share, budget.seed + 1)
            fit_part = {name: array for name, array in fit.items() if name != "labels"}
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


def feeds(model: ModelLike, parts: DataParts, batch_size: int, *, judge: bool, responses: bool,
          held_out: bool) -> Feeds:
    """The parts' feeds; the original's outputs on the judge part (``judge``), on the samples the layer responses
    run on (``responses``) and on the held-out part (``held_out``)."""
    source, loaded = model_source(model)
    original = make_session(source)
    kinds = output_kinds(loaded) if loaded is not None else None

    def batches(part: Mapping[str, np.ndarray]) -> list[Feed]:
        inputs = {name: array for name, array in part.items() if name != "labels"}
        return list(split_batches(load_data(inputs, original)[0], original, batch_size))

    judged = batches(parts.calibration_part)
    fit = batches(parts.fit_part) if parts.fit_part else judged
    response = response_batches(original, judged) if responses else None
    held = batches(parts.held_out) if held_out and parts.held_out is not None else None
    return Feeds(judged, fit,
                 judge_reference=reference_outputs(original, judged, kinds) if judge else None,
                 response=response,
                 response_reference=reference_outputs(original, response, kinds) if response is not None else None,
                 held=held,
                 held_reference=reference_outputs(original, held, kinds) if held is not None else None)
