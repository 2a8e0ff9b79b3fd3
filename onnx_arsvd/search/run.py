"""One search under a budget, from the data split to a frozen result: prepare, then run."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnx_arsvd.config import LatencyGuard
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.graph.outputs import DECISIONS, SCORE, output_kinds
from onnx_arsvd.io.arrays import DataSource
from onnx_arsvd.io.calls import Calls
from onnx_arsvd.measure.guard import LatencyTable
from onnx_arsvd.measure.verification import ModelLike
from onnx_arsvd.methods.lowrank.model_plan import ModelPlan, PlanMemo
from onnx_arsvd.methods.lowrank.settings import CalibrationSource, Settings
from onnx_arsvd.methods.quantize.configs import Quantization
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.frontier import held_out_frontier
from onnx_arsvd.search.judge import Judge
from onnx_arsvd.search.parts import DataParts, Feeds, feeds, part_labels, split_parts
from onnx_arsvd.search.space import AllocationSpace, allocation_space
from onnx_arsvd.search.steps import FrontierRow, SearchStep
from onnx_arsvd.search.strategies import (
    Choice,
    by_accuracy,
    by_latency,
    by_params,
    by_threshold,
    check_latency_target,
    timed_bound,
)

__all__ = ["PreparedSearch", "SearchOutcome", "SearchResult", "prepare_search", "run_search"]


@dataclass(frozen=True)
class PreparedSearch:
    """A budget, the data split for it, and the allocation it runs (``"global"``, or ``"threshold"``: always
    for l_p factors, which have no loss curves)."""

    budget: Budget
    parts: DataParts
    allocation: str


def prepare_search(budget: Budget, model: ir.Model, data: DataSource | Calls | None,
                   labels: np.ndarray | str | os.PathLike | None, method: str, calibration: CalibrationSource | None,
                   latency: LatencyGuard | None) -> PreparedSearch:
    """Check that the budget can be searched with this method and guard, and split the data for it."""
    what = "a latency target" if budget.target_latency is not None else "minimizing latency"
    if budget.prices_latency and latency is None:
        raise InvalidInputError(f"{what} needs the latency guard: its provider and batch sizes")
    if budget.prices_latency and method == "lp":
        raise InvalidInputError(f"{what} needs the global allocation, which l_p factors do not have")
    if budget.max_flips is not None and not any(kind in (DECISIONS, SCORE) for kind in output_kinds(model).values()):
        raise InvalidInputError("`max_flips` needs an output that decides (class scores, probabilities or a score per "
                                "sample); this model's outputs are values: give `min_cosine` instead")
    parts = split_parts(budget, model, data, labels, method, calibration)
    return PreparedSearch(budget, parts, budget.allocation if method != "lp" else "threshold")


@dataclass(frozen=True)
class SearchResult:
    """What the search found, as the report shows it."""

    budget: Budget
    allocation: str
    """``"threshold"``, or the global allocation's description."""
    samples: dict[str, int]
    chosen: SearchStep
    steps: tuple[SearchStep, ...]
    frontier: tuple[FrontierRow, ...] = ()
    notes: tuple[str, ...] = ()
    latency_bound: float | None = None
    """With an accuracy budget and a latency target: the chosen point's whole-model latency, x the original's
    (95% upper prediction bound)."""
    quantize: str | None = None
    quantize_dropped: str = ""
    """Why the requested quantization was dropped, or ""."""
    unit: str = "samples"
    """What the data's parts count: samples, or calls for data given one feed per call."""

    @property
    def met(self) -> bool:
        return self.chosen.feasible

    def summary(self) -> dict[str, object]:
        """The result as plain data (the report's ``budget``)."""
        return {"budget": self.budget.describe(), "measure": self.budget.measure,
                "timed": self.budget.target_latency is not None and not self.budget.judges_outputs,
                "latency_bound": self.latency_bound, "met": self.met, "tau": self.chosen.tau, "samples": self.samples,
                "unit": self.unit,
                "allocation": self.allocation, "quantize": self.quantize,
                "steps": [dataclasses.asdict(step) for step in self.steps],
                "frontier": [row.as_dict() for row in self.frontier], "notes": list(self.notes)}


@dataclass(frozen=True)
class SearchOutcome:
    """The settings (with the chosen threshold), the memo of spectra the search filled, for a global allocation the
    chosen plan of the model given to :func:`run_search`, and the result."""

    settings: Settings
    memo: PlanMemo
    planned: ModelPlan | None
    result: SearchResult


def _judge(prepared: PreparedSearch, data: Feeds, quantize: Quantization | None, scratch: Path | None, *,
           held: bool = False) -> Judge | None:
    """The judge on the calibration part, or (``held``) on the held-out part; None without its reference."""
    parts = prepared.parts
    reference = data.held_reference if held else data.judge_reference
    if reference is None:
        return None
    part = parts.held_out if held else parts.calibration_part
    return Judge(prepared.budget, reference, (data.held if held else data.judge) or [],
                 part_labels(part), parts.held_samples, quantize, scratch)


def run_search(prepared: PreparedSearch, model: ModelLike, loaded: ir.Model, settings: Settings, *,
               quantize: Quantization | None = None, batch_size: int, latency: LatencyTable | None = None,
               dims: Mapping[str, int] | None = None, scratch: Path | None = None,
               progress: bool = False, score_threshold: float | None = None) -> SearchOutcome:
    """Search under the budget; each candidate (unless the budget is on parameters alone) checked in onnxruntime.

    ``model`` is the original as given (timed against), ``loaded`` its IR (never rewritten: candidates are clones);
    ``score_threshold``: where an output of one score per sample decides.
    """
    budget, parts, dims = prepared.budget, prepared.parts, dict(dims or {})
    global_ = prepared.allocation == "global"
    data = (feeds(model, parts, batch_size, judge=budget.judges_outputs, responses=global_ and budget.sensitivity,
                  held_out=global_, kinds=output_kinds(loaded), threshold=score_threshold)
            if parts.calibration_part else None)
    judge = _judge(prepared, data, quantize, scratch) if data is not None else None
    quantized_with = quantize.describe() if quantize is not None else None
    unit = "calls" if parts.per_call else "samples"
    if not global_:
        choice, settings, memo = by_threshold(loaded, settings, judge, budget.target_params, budget.steps, progress,
                                              quantize is not None)
        result = SearchResult(budget, "threshold", parts.samples(), choice.chosen, choice.steps,
                              notes=(*parts.notes, *choice.notes), quantize=quantized_with, unit=unit)
        return SearchOutcome(settings, memo, None, result)
    space = allocation_space(loaded, settings, budget, data, latency=latency, dims=dims, progress=progress)
    choice = _choose(space, budget, judge, model, latency, quantize, scratch, dims, progress)
    assert choice.chosen.point is not None  # a global allocation chooses a point
    planned = space.plan(choice.chosen.point, loaded)
    frontier: list[FrontierRow] = []
    missed: list[str] = []
    held = _judge(prepared, data, quantize, scratch, held=True) if data is not None else None
    if held is not None:
        frontier, missed = held_out_frontier(space, choice.chosen, held)
    result = SearchResult(budget, space.describe(), parts.samples(), choice.chosen, choice.steps, tuple(frontier),
                          (*parts.notes, *choice.notes, *missed), choice.latency_bound, quantized_with, choice.dropped,
                          unit)
    return SearchOutcome(settings, space.memo, planned, result)


def _choose(space: AllocationSpace, budget: Budget, judge: Judge | None, model: ModelLike,
            latency: LatencyTable | None, quantize: Quantization | None, scratch: Path | None, dims: dict[str, int],
            progress: bool) -> Choice:
    """The strategy the budget asks for, run on the frontier."""
    def timed(quantized: bool) -> Callable[[int], float]:
        """A point's whole-model latency bound, quantized or not."""
        assert latency is not None  # prepare_search made sure
        guard = latency.guard
        return lambda index: timed_bound(space, index, model, guard, quantize if quantized else None, scratch, dims)

    if budget.target_params is not None:
        return by_params(space, budget.target_params, quantize is not None)
    if not budget.judges_outputs:
        assert budget.target_latency is not None  # a budget judges outputs, or has a parameter or latency target
        return by_latency(space, budget.target_latency, timed(quantize is not None), quantize is not None, progress)
    assert judge is not None  # an accuracy budget has data, so a judge
    choice = by_accuracy(space, judge, progress)
    if budget.target_latency is None:
        return choice
    return check_latency_target(choice, budget.target_latency, timed(choice.chosen.quantized))
