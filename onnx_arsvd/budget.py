"""Rank selection under a budget: the fewest parameters that keep accuracy, without retraining.

The data is split once: a calibration part, which chooses, and a held-out part, never used to
choose, on which the result is reported. When the search fits factors to data (whitened factors'
input Gram matrices, sequential refits), the calibration part is split again: a fit part for those
and a judge part for the end-to-end checks, so no candidate is judged on the samples its factors
were fitted to. Judged on its own fit samples, a whitened candidate looks better than it is: the
MiniLM 0.99 cosine budget was met on the calibration part (bound 0.9901) and missed on the
held-out part (0.9881).

Global allocation (the default): every weight is decomposed once into its loss curve (output error
at every rank, :mod:`onnx_arsvd.losscurve`); each layer's end-to-end gain is measured once
(:mod:`onnx_arsvd.sensitivity`); the knapsack frontier of (parameters, predicted loss) over every
layer's ranks and "dense" (:mod:`onnx_arsvd.allocate`) is then bisected: the cheapest point whose
model meets the budget on the calibration part. A point that crosses the budget is rolled back
(the search keeps the last point that met it). With ``quantize`` every candidate is quantized
before it is judged, so the budget judges the model that ships; if even quantization alone
misses the budget, the search runs again without it and says so. Candidates run in batches of the verification's size:
dynamic INT8 takes each activation's scale from the whole batch, so its outputs depend on the batching.

A latency target (``target_latency``) prices every rank in the guard's measured per-layer latency
(:mod:`onnx_arsvd.latency_cost`) and bisects that frontier the other way: the most accurate point whose
whole model, timed against the original at every guard batch size, is within the target by a 95% upper
prediction bound (the median alone kept points just under the target, which the final timing then
missed). The per-layer prices leave out the rest of the graph, so only the whole-model timing decides;
the final check times the written model again, and a miss there is reported as a miss. With an accuracy
budget as well, the fastest point within that budget is timed once the same way.

With ``sequential`` every candidate's factors are refitted layer by layer on the partially
compressed model's activations (:mod:`onnx_arsvd.sequential`) before it is judged.

Threshold (``allocation="threshold"``, and always with l_p factors): one global threshold tau on
every layer's own output-energy curve, found by bisection, as before.

An accuracy budget is judged by a one-sided 95% upper bound of the drop, a cosine budget by a lower
bound of the mean cosine, not by the point estimates: a search that stops exactly at the budget on
one sample overshoots it on another about half the time. The bounds predict the held-out
measurement (both parts' sampling noise), since that is what the report shows.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from onnx_arsvd.allocate import DENSE, Allocation, LayerOptions, best_within, frontier, param_cost
from onnx_arsvd.calibration import curve_grams, output_errors
from onnx_arsvd.candidates import WeightKey
from onnx_arsvd.curves import WeightCurve, allocation_plans, weight_curves, weight_options
from onnx_arsvd.data import Feed, load_data, load_labels, sample_count, split_batches
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.guard import LatencyGuard, observed_rows
from onnx_arsvd.latency_cost import LatencyCosts, latency_costs
from onnx_arsvd.model_io import to_model
from onnx_arsvd.model_plan import (
    HEAD_REASON,
    UNREACHED_REASON,
    LayerSelection,
    ModelPlan,
    PlanMemo,
    feeds_graph_output,
    plan_model,
    select_layers,
)
from onnx_arsvd.plan import LayerDecision, WeightPlan, dense_decision, plan_layers
from onnx_arsvd.quantize import Quantization
from onnx_arsvd.rank import EnergyPolicy
from onnx_arsvd.results import VerificationReport
from onnx_arsvd.rewrite import apply_plans
from onnx_arsvd.sensitivity import DEFAULT_PROBES, Response, layer_responses
from onnx_arsvd.sequential import sequential_factors
from onnx_arsvd.sessions import make_session, model_session, run_session
from onnx_arsvd.settings import CalibrationSource, Settings
from onnx_arsvd.verification import (
    DEFAULT_BATCH_SIZE,
    ModelLike,
    ReferenceOutputs,
    compare_with_reference,
    model_source,
    reference_outputs,
)

__all__ = ["ALLOCATIONS", "COSTS", "Budget", "BudgetSearch", "SearchOutcome", "SearchStep", "bisect_index",
           "bisect_tau", "first_samples", "response_batches", "split_data"]

ALLOCATIONS = ("global", "threshold")
SILENT_REASON = "factoring it changed no output on the calibration data: kept dense, nothing could judge it"
COSTS = ("params", "latency")
Z_95 = 1.645
RESPONSE_VALUES = 2**20
"""Output values each layer's end-to-end response is measured on: the first calibration samples whose outputs
hold that many (at least 32 samples; all of them when they hold fewer). A response is a ratio of sums over
every output value, so it needs values, not samples: an MLP's 10 logits per image use the whole calibration
part, MiniLM's 384 values per token 43 of its 120 sentences, whose responses are within 13% of the
120 sentences' (``benchmarks/results/response_samples.md``), in 0.56x the time. Candidates are still
judged on the whole calibration part."""
"""One-sided 95% normal quantile."""


@dataclass(frozen=True)
class Budget:
    """One of: at most ``max_drop`` accuracy points lost (needs labels), a mean output cosine of at
    least ``min_cosine``, at most ``target_params`` of the dense parameters kept, or a whole-model latency of
    at most ``target_latency`` times the original's (measured on the latency guard's provider and batch sizes)."""

    max_drop: float | None = None
    min_cosine: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    holdout: float = 0.4
    seed: int = 0
    steps: int = 12
    allocation: str = "global"
    rank_multiple: int = 8
    """Ranks are multiples of this (finer for small layers): benchmarks/results/rank_multiple.md."""
    sensitivity: bool = True
    """Map each layer's loss through its measured end-to-end response (needs data); else relative losses."""
    sequential: bool = False
    """Refit every candidate's factors layer by layer on the partially compressed model (needs data)."""
    fit_share: float = 0.5
    """Share of the calibration part that fits factors (Grams, refits) when the search fits to data; the rest judges."""
    minimize: str = "params"
    """What the search makes least within an accuracy budget: parameters, or the dense layers' measured latency
    (:mod:`onnx_arsvd.latency_cost`; global allocation only)."""

    def __post_init__(self) -> None:
        given = sum(v is not None for v in (self.max_drop, self.min_cosine, self.target_params))
        if given > 1 or (given == 0 and self.target_latency is None):
            raise InvalidInputError("give one budget: max_drop, min_cosine or target_params, or target_latency "
                                    "(alone or with max_drop or min_cosine)")
        if self.target_params is not None and self.target_latency is not None:
            raise InvalidInputError("a parameter target and a latency target cannot both be met as accurately as "
                                    "possible: give one")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise InvalidInputError(f"max_drop must be a non-negative number of points, got {self.max_drop}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise InvalidInputError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise InvalidInputError(f"target_params must be in (0, 1], got {self.target_params}")
        if self.target_latency is not None and not 0.0 < self.target_latency <= 1.0:
            raise InvalidInputError(f"target_latency must be in (0, 1], got {self.target_latency}")
        if self.target_latency is not None and self.allocation != "global":
            raise InvalidInputError("a latency target needs the global allocation")
        if not 0.0 < self.holdout < 1.0:
            raise InvalidInputError(f"holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 < self.fit_share < 1.0:
            raise InvalidInputError(f"fit_share must be in (0, 1), got {self.fit_share}")
        if self.steps < 1:
            raise InvalidInputError(f"search steps must be at least 1, got {self.steps}")
        if self.allocation not in ALLOCATIONS:
            raise InvalidInputError(f"unknown allocation {self.allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
        if self.rank_multiple < 1:
            raise InvalidInputError(f"rank_multiple must be at least 1, got {self.rank_multiple}")
        if self.minimize not in COSTS:
            raise InvalidInputError(f"unknown cost to minimize {self.minimize!r}; choose one of: {', '.join(COSTS)}")
        if self.minimize == "latency" and self.target_params is not None:
            raise InvalidInputError("minimizing latency needs an accuracy budget (max_drop or min_cosine), "
                                    "not a parameter target")
        if self.minimize == "latency" and self.allocation != "global":
            raise InvalidInputError("minimizing latency needs the global allocation")
        if self.sequential and self.allocation != "global":
            raise InvalidInputError("sequential refits need the global allocation")

    @property
    def needs_data(self) -> bool:
        return self.target_params is None

    @property
    def prices_latency(self) -> bool:
        """Whether the allocation costs each rank in measured latency (to minimize it, or to meet a latency target)."""
        return self.minimize == "latency" or self.target_latency is not None

    @property
    def judges_outputs(self) -> bool:
        """Whether each search step compares the candidate's outputs with the original's (an accuracy budget)."""
        return self.max_drop is not None or self.min_cosine is not None

    @property
    def measure(self) -> str | None:
        """What each search step measures in onnxruntime; None when parameters alone decide."""
        if self.max_drop is not None:
            return "accuracy drop, 95% upper prediction bound for the held-out part (points)"
        if self.min_cosine is not None:
            return "mean output cosine, 95% lower prediction bound"
        if self.target_latency is not None:
            return "whole-model latency (x the original's), 95% upper prediction bound, slowest batch size"
        return None

    def describe(self) -> str:
        latency = (f"whole-model latency at most {self.target_latency:g}x the original's"
                   if self.target_latency is not None else "")
        if self.max_drop is not None:
            accuracy = f"at most {self.max_drop:g} accuracy points lost"
        elif self.min_cosine is not None:
            accuracy = f"mean output cosine at least {self.min_cosine:g}"
        elif self.target_params is not None:
            accuracy = f"at most {self.target_params:.1%} of the dense parameters"
        else:
            return latency
        return f"{accuracy}, {latency}" if latency else accuracy


@dataclass(frozen=True)
class SearchStep:
    """One candidate of the search: its threshold (or frontier point), dense parameters kept, measured
    value, verdict; for a frontier point also its predicted loss, serialized bytes, whether it was quantized and,
    when the search minimizes latency, its predicted share of the dense layers' latency."""

    tau: float | None
    params_kept: float
    value: float | None
    feasible: bool
    point: int | None = None
    predicted_loss: float | None = None
    model_bytes: int | None = None
    quantized: bool = False
    latency: float | None = None


@dataclass(frozen=True)
class FrontierRow:
    """One variant measured on the held-out part: its serialized bytes, dense parameters kept, the
    lowest mean output cosine over the outputs and, with labels, the accuracy drop in points."""

    variant: str
    model_bytes: int
    params_kept: float
    mean_cosine: float
    accuracy_drop: float | None = None

    def as_dict(self) -> dict[str, object]:
        """The row as the report shows it (no accuracy_drop key without labels)."""
        row: dict[str, object] = {"variant": self.variant, "model_bytes": self.model_bytes,
                                  "params_kept": self.params_kept, "mean_cosine": self.mean_cosine}
        if self.accuracy_drop is not None:
            row["accuracy_drop"] = self.accuracy_drop
        return row


def response_batches(session: ort.InferenceSession, batches: Sequence[Feed], values: int = RESPONSE_VALUES,
                     least: int = 32) -> list[Feed]:
    """The first calibration samples whose outputs hold ``values`` values (at least ``least`` samples)."""
    if not batches or not batches[0]:
        return list(batches)
    one = {name: array[:1] for name, array in batches[0].items()}
    per_sample = max(1, sum(np.asarray(output).size for output in run_session(session, None, one)))
    return first_samples(batches, max(least, math.ceil(values / per_sample)))


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


def split_data(arrays: Mapping[str, np.ndarray], holdout: float,
               seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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


def bisect_tau(
    evaluate: Callable[[float], SearchStep],
    steps: int,
    *,
    low: float = 1e-6,
    high: float = 1.0,
    feasible_above: bool = True,
) -> tuple[SearchStep, list[SearchStep]]:
    """The feasible step nearest the feasibility boundary, found by bisection on [low, high], and every step.

    With ``feasible_above`` (an accuracy budget: more energy kept, more accurate) the answer is the
    smallest feasible tau and ``high`` is tried first; otherwise (a parameter budget: more energy
    kept, more parameters) the largest feasible tau, and ``low`` is tried first. The first step is
    the safe end, so an infeasible search returns it, marked infeasible.
    """
    best = evaluate(high if feasible_above else low)
    tried = [best]
    if not best.feasible:
        return best, tried
    for _ in range(steps):
        middle = (low + high) / 2
        step = evaluate(middle)
        tried.append(step)
        if step.feasible == feasible_above:  # the boundary lies below middle
            high = middle
        else:
            low = middle
        if step.feasible:
            best = step
        if math.isclose(low, high, abs_tol=1e-6):
            break
    return best, tried


def bisect_index(evaluate: Callable[[int], SearchStep], count: int, steps: int, *,
                 feasible_above: bool = True) -> tuple[SearchStep, list[SearchStep]]:
    """The feasible index in [0, count) nearest the feasibility boundary by bisection, and every step.

    Feasibility is taken as monotone in the index (a frontier: more cost, less predicted loss). With
    ``feasible_above`` (an accuracy budget) the answer is the smallest feasible index and the last (safest)
    is tried first; otherwise (a latency target: more cost, slower) the largest, and index 0 is tried
    first. An infeasible search returns that first step, marked infeasible.
    """
    safe = count - 1 if feasible_above else 0
    best = evaluate(safe)
    tried = [best]
    if not best.feasible:
        return best, tried
    low, high = (-1, safe) if feasible_above else (safe, count)  # the feasible end is high, resp. low
    for _ in range(steps):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        step = evaluate(middle)
        tried.append(step)
        if step.feasible:
            best = step
        if step.feasible == feasible_above:
            high = middle
        else:
            low = middle
    return best, tried


@dataclass(frozen=True)
class SearchOutcome:
    """The settings (with the chosen threshold), the memo the search filled, and, for a global
    allocation, the chosen plan of the model given to :meth:`BudgetSearch.run`."""

    settings: Settings
    memo: PlanMemo
    planned: ModelPlan | None = None


class BudgetSearch:
    """Splits the data, then finds the model with the fewest parameters that meets the budget.

    ``labels`` are the ones to judge with, as the caller resolved them (:func:`onnx_arsvd.api.compress` passes
    those given, or the data's own when the model's first output can take them); a ``labels`` array in
    ``data`` is not read.
    """

    def __init__(
        self,
        model: ModelLike,
        budget: Budget,
        data: str | os.PathLike | Mapping[str, np.ndarray] | None,
        labels: np.ndarray | str | os.PathLike | None,
        method: str,
        calibration: CalibrationSource | None,
        quantize: Quantization | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        latency: LatencyGuard | None = None,
        dims: Mapping[str, int] | None = None,
        loaded: ir.Model | None = None,
        scratch: Path | None = None,
    ) -> None:
        """``loaded`` is ``model`` already opened, when the caller has it (else it is opened to read its inputs);
        ``scratch`` is the run's staging folder, where the quantizer keeps its copies of each candidate."""
        self.scratch = scratch
        self.model, self.budget, self.quantize, self.batch_size = model, budget, quantize, batch_size
        self.latency, self.dims = latency, dict(dims or {})
        what = "a latency target" if budget.target_latency is not None else "minimizing latency"
        if budget.prices_latency and latency is None:
            raise InvalidInputError(f"{what} needs the latency guard: its provider and batch sizes")
        if budget.prices_latency and method == "lp":
            raise InvalidInputError(f"{what} needs the global allocation, which l_p factors do not have")
        self.calibration_part: dict[str, np.ndarray] = {}
        self.held_out: dict[str, np.ndarray] | None = None
        self.steps: list[SearchStep] = []
        self.chosen: SearchStep | None = None
        self.frontier_rows: list[FrontierRow] = []
        self.notes: list[str] = []
        self.allocation = budget.allocation if method != "lp" else "threshold"
        if budget.needs_data and data is None:
            raise InvalidInputError("an accuracy budget needs data: inputs (and labels) to split and measure")
        if data is not None:  # a parameter budget uses data too: to calibrate, and to verify on the held-out part
            arrays = load_data(data, loaded if loaded is not None else to_model(model))[0]  # checked: per-call inputs
            # repeated for each sample, so the split slices every array alike
            if labels is not None:
                arrays["labels"] = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
            if budget.max_drop is not None and "labels" not in arrays:
                raise InvalidInputError("max_drop needs labels (a 'labels' array in the data, or labels given apart)")
            self.calibration_part, self.held_out = split_data(arrays, budget.holdout, budget.seed)
        if method == "whitened" and calibration is None and not self.calibration_part:
            raise InvalidInputError("the whitened method needs calibration inputs "
                                    "(calibration data, or the budget's data)")
        self.fit_part: dict[str, np.ndarray] = {}
        if self.calibration_part and ((method == "whitened" and calibration is None) or budget.sequential):
            self.fit_part = self._split_fit()
        self.calibration: CalibrationSource | None = (
            calibration if calibration is not None else (self.fit_part or self.calibration_part or None))
        self._loaded: ir.Model | None = None
        self._batches: list[Feed] = []
        self._fit_batches: list[Feed] = []
        self._response_batches: list[Feed] = []
        self._held_batches: list[Feed] = []
        self._reference: ReferenceOutputs | None = None
        self._response_reference: ReferenceOutputs | None = None
        self._held_reference: ReferenceOutputs | None = None
        self._settings = Settings()
        self._memo = PlanMemo()
        self._curves: list[WeightCurve] = []
        self._unjudged: dict[WeightKey, str] = {}
        self._points: list[Allocation] = []
        self._total = 0.0
        self._fixed = 0.0
        self._refits: dict[int, dict[WeightKey, tuple[np.ndarray, np.ndarray]]] = {}
        self._costs: LatencyCosts | None = None
        self.latency_bound: float | None = None
        """With an accuracy budget and a latency target: the chosen point's whole-model latency, x the original's
        (95% upper prediction bound)."""

    def _split_fit(self) -> dict[str, np.ndarray]:
        """Split the calibration part into the fit part (returned, without labels) and the judge part (kept)."""
        if sample_count(self.calibration_part) < 2:
            self.notes.append("too few calibration samples to fit and judge on different ones: "
                              "the calibration bound is optimistic")
            return {}
        fit, self.calibration_part = split_data(self.calibration_part, 1.0 - self.budget.fit_share,
                                                self.budget.seed + 1)
        return {name: array for name, array in fit.items() if name != "labels"}

    def run(self, loaded: ir.Model, settings: Settings, progress: bool = False) -> SearchOutcome:
        """Search under the budget; each candidate (unless the budget is on parameters alone) checked in onnxruntime."""
        self._loaded = loaded
        if self.calibration_part:  # end-to-end checks, and (for a global allocation) the layers' gains
            self._prepare_judging()
        if self.allocation == "threshold":
            return self._run_threshold(loaded, settings, progress)
        return self._run_global(loaded, settings, progress)

    def _prepare_judging(self) -> None:
        """The data parts as feeds, and the original's outputs that the search compares with, computed once
        from one session: on the calibration part (to judge candidates, unless parameters alone decide), on
        the samples the layer responses run on, and on the held-out part. So no session of the original
        stays open (it held onnxruntime's copy of every weight through the search), and the original does
        not run again per candidate or for the responses."""
        original = make_session(model_source(self.model)[0])
        self._batches = self._feed_batches(original, self.calibration_part)
        self._fit_batches = self._feed_batches(original, self.fit_part) if self.fit_part else self._batches
        if self.budget.judges_outputs:
            self._reference = reference_outputs(original, self._batches)
        if self.allocation == "global" and self.budget.sensitivity:
            self._response_batches = response_batches(original, self._batches)
            self._response_reference = reference_outputs(original, self._response_batches)
        if self.held_out is not None and self.allocation == "global":  # its report measures the frontier held out
            self._held_batches = self._feed_batches(original, self.held_out)
            self._held_reference = reference_outputs(original, self._held_batches)

    def _feed_batches(self, session: ort.InferenceSession, part: Mapping[str, np.ndarray]) -> list[Feed]:
        """A data part (its labels left out) as the model's feeds, in batches of the verification's size."""
        inputs = {name: array for name, array in part.items() if name != "labels"}
        return list(split_batches(load_data(inputs, session)[0], session, self.batch_size))

    # -- one candidate, judged in onnxruntime ------------------------------------------------------------------

    def _candidate(self) -> ir.Model:
        """A clone of the model given to :meth:`run`, to rewrite into one candidate: it shares the original's
        weights, so no candidate reloads or copies them."""
        assert self._loaded is not None  # run() set it
        return self._loaded.clone()

    def _judged(self, candidate: ir.Model, quantized: bool, held_out: bool = False) -> tuple[VerificationReport, int]:
        """The comparison with the original on the calibration part (or the held-out part), and the candidate's
        size: serialized when quantized (onnxruntime's quantizers return a proto), else as written with external
        data (:func:`model_session` never serializes the weights)."""
        reference = self._held_reference if held_out else self._reference
        assert reference is not None  # run() made it: only data-driven budgets judge candidates
        batches = self._held_batches if held_out else self._batches
        part = self.held_out if held_out else self.calibration_part
        labels = part.get("labels") if part is not None else None
        if quantized and self.quantize is not None:
            serialized = self.quantize.apply(candidate, self.scratch).SerializeToString()
            session, nbytes = make_session(serialized), len(serialized)
            del serialized  # onnxruntime holds its own copy: not this one too while the candidate runs
        else:
            session, nbytes = model_session(candidate)
        return compare_with_reference(reference, session, batches, labels=labels), nbytes

    def _verdict(self, result: VerificationReport) -> tuple[float | None, bool]:
        """The measured bound and whether it is within the budget.

        The bound is a 95% *prediction* bound for what the held-out part will measure: the held-out
        estimate has its own sampling noise, so the standard error is widened by sqrt(1 + n_cal / n_held)
        (the variance of a difference of two independent means). The plain confidence bound let the
        Fashion MLP at a 0.5-point budget measure 0.60 points on its 4,000 held-out images.
        """
        held = sample_count(self.held_out or {})
        z = Z_95 * (np.sqrt(1.0 + result.samples / held) if held else 1.0)
        if self.budget.max_drop is not None:
            bound = result.accuracy_drop_bound(float(z))
            return (None, False) if bound is None else (float(bound), bool(bound <= self.budget.max_drop))
        cosine = float(min(o.cosine_bound(float(z)) for o in result.outputs))
        return cosine, bool(cosine >= (self.budget.min_cosine or 0.0))

    # -- global allocation ---------------------------------------------------------------------------------------

    def _run_global(self, loaded: ir.Model, settings: Settings, progress: bool) -> SearchOutcome:
        memo = self._memo
        selection = self._select(loaded, settings)
        grams = None
        if settings.method == "whitened" and selection.dense:
            if settings.calibration is None:  # Settings refuses the whitened method without calibration inputs
                raise ValueError("whitened settings without calibration inputs")
            grams = curve_grams(loaded, selection.dense, settings.calibration, progress=progress)
        reached = set(grams) if grams is not None else None
        self._settings = settings
        # the curves hold all the search needs: each Gram (float64, m x m) is dropped once its curve is made
        self._curves = weight_curves(selection.dense, grams, progress=progress, jobs=settings.jobs, release=True,
                                     max_rank_fraction=settings.max_rank_fraction, probes=DEFAULT_PROBES)
        del grams
        if self.budget.prices_latency:
            self._costs = self._latency_costs(loaded, settings, progress)
        responses: Mapping[WeightKey, Response] = {}
        if self._response_reference is not None:
            choosing = [c for c, o in zip(self._curves, self._options(settings, None), strict=True)
                        if len(o.choices) > 1]
            responses = layer_responses(loaded, choosing, self._response_batches, progress=progress,
                                        reference=self._response_reference)
        self._set_aside_unjudged(reached, responses)
        self._points = frontier(self._options(settings, responses))
        self._total = sum(d.params for d in self._dense_decisions(self._points[-1], loaded))
        self._fixed = sum(d.params_after for d in self._dense_decisions(self._points[0], loaded, outside=True))
        if self.budget.target_params is not None:
            chosen = best_within(self._points, self.budget.target_params * self._total - self._fixed)
            index = self._points.index(chosen) if chosen is not None else 0
            step = self._step(index, None, False)
            self.chosen = dataclasses.replace(step, feasible=chosen is not None)
            self.steps = [self.chosen]
        elif not self.budget.judges_outputs:
            self._bisect_latency(progress)
        else:
            self._bisect(progress)
            self._check_latency_target()
        assert self.chosen is not None and self.chosen.point is not None
        planned = self._plan(self._points[self.chosen.point], loaded, self._refitted(self.chosen.point))
        if self._held_reference is not None:
            self._measure_frontier(self.chosen.point)
        return SearchOutcome(settings, memo, planned)

    def _select(self, model: ir.Model, settings: Settings) -> LayerSelection:
        """The model's layers; set aside, dense: the weights the data cannot judge (:meth:`_set_aside_unjudged`),
        and without ``factor_heads`` the layers feeding a graph output."""
        selection = select_layers(model, settings)
        aside = [(layer, reason) for layer in selection.dense if (reason := self._unjudged.get(layer.weight_key))]
        if not settings.factor_heads:
            aside += [(layer, HEAD_REASON) for layer in selection.dense
                      if feeds_graph_output(layer.node) and layer.weight_key not in self._unjudged]
        if not aside:
            return selection
        kept = {id(layer) for layer, _ in aside}
        return dataclasses.replace(selection, dense=[layer for layer in selection.dense if id(layer) not in kept],
                                   excluded=selection.excluded + aside)

    def _set_aside_unjudged(self, reached: set[WeightKey] | None, responses: Mapping[WeightKey, Response]) -> None:
        """Keep dense the weights the calibration data cannot judge: those whose layers it never reached (a branch
        not taken: no input Gram) and those whose factoring changed no output on it (a response of 0). Their
        predicted loss would be 0 at any rank, so the allocation would factor them to the least rank for free,
        and no end-to-end check on this data would see the damage."""
        for c in self._curves:
            if reached is not None and c.key not in reached:
                self._unjudged[c.key] = UNREACHED_REASON
            elif c.key in responses and responses[c.key].scale == 0:
                self._unjudged[c.key] = SILENT_REASON
        self._curves = [c for c in self._curves if c.key not in self._unjudged]

    def _options(self, settings: Settings, responses: Mapping[WeightKey, Response] | None) -> list[LayerOptions]:
        return weight_options(self._curves, responses=responses, multiple=self.budget.rank_multiple,
                              max_rank_fraction=settings.max_rank_fraction, min_params=settings.min_params,
                              costs=self._costs.costs if self._costs is not None else None)

    def _latency_costs(self, loaded: ir.Model, settings: Settings, progress: bool) -> LatencyCosts:
        """Every weight's measured latency at the ranks it may take, each layer at the rows it sees on the data."""
        assert self.latency is not None and self._batches  # __init__ and run() made sure
        layers = [layer for c in self._curves for layer in c.layers]
        rows = observed_rows(loaded, layers, first_samples(self._batches, 8)[0])
        return latency_costs(self._curves, self.latency, self.latency.provider(), rows, self.dims,
                             multiple=self.budget.rank_multiple, max_rank_fraction=settings.max_rank_fraction,
                             min_params=settings.min_params, progress=progress)

    def _refitted(self, index: int) -> dict[WeightKey, tuple[np.ndarray, np.ndarray]] | None:
        """With ``sequential``, the frontier point's factors refitted layer by layer (once per point)."""
        if not self.budget.sequential or not self._fit_batches:
            return None
        if index not in self._refits:
            self._refits[index] = sequential_factors(self._candidate(), self._curves, self._points[index],
                                                     self._fit_batches)
        return self._refits[index]

    def _plan(self, point: Allocation, model: ir.Model,
              factors: Mapping[WeightKey, tuple[np.ndarray, np.ndarray]] | None = None) -> ModelPlan:
        """The plan of ``model`` (the original or a fresh copy) at an allocation; embedding tables by their policy."""
        selection = self._select(model, self._settings)
        plans = allocation_plans(selection.dense, self._curves, point, min_params=self._settings.min_params,
                                 factors=factors)
        if selection.embeddings and self._settings.embedding_policy is not None:
            plans += plan_layers(selection.embeddings, self._settings.embedding_policy,
                                 max_rank_fraction=self._settings.max_rank_fraction,
                                 min_params=self._settings.min_params, cache=self._memo.spectra)
        excluded = [(layer, dense_decision(layer, reason)) for layer, reason in selection.excluded]
        return ModelPlan(plans, excluded, selection.skipped, selection.order)

    def _dense_decisions(self, point: Allocation, model: ir.Model, outside: bool = False) -> list[LayerDecision]:
        """Each dense layer's decision at an allocation, a shared weight once, embedding tables apart (as the report
        and :meth:`ModelPlan.params_kept` count); with ``outside``, only the layers the allocation does not choose."""
        chosen = {c.key for c in self._curves} if outside else set()
        planned = self._plan(point, model)
        firsts = [(plan.layers[0], plan.decisions[0]) for plan in planned.plans] + planned.excluded
        return [d for layer, d in firsts if not layer.is_embedding and layer.weight_key not in chosen]

    def _kept(self, index: int) -> float:
        """Share of the dense parameters a frontier point keeps."""
        ranks = self._points[index].ranks
        allocated = sum(param_cost(c.curve.shape, ranks.get(c.key, DENSE)) for c in self._curves)
        return (allocated + self._fixed) / self._total

    def _step(self, index: int, measured: tuple[float | None, bool, int | None] | None, quantized: bool) -> SearchStep:
        value, feasible, nbytes = measured if measured is not None else (None, True, None)
        point, dense = self._points[index], self._points[-1]
        latency = point.cost / dense.cost if self._costs is not None and dense.cost > 0 else None
        return SearchStep(None, self._kept(index), value, feasible, index, point.loss, nbytes, quantized, latency)

    def _bisect(self, progress: bool) -> None:
        """Bisect the frontier with quantization (when asked), and without it if quantization alone misses."""
        for quantized in ([True, False] if self.quantize is not None else [False]):
            bar = tqdm(total=self.budget.steps + 1, desc="budget search" + (" (quantized)" if quantized else ""),
                       unit="step", disable=None if progress else True)

            def evaluate(index: int, quantized: bool = quantized, bar: tqdm = bar) -> SearchStep:
                candidate = self._candidate()
                apply_plans(candidate, self._plan(self._points[index], candidate, self._refitted(index)).plans)
                result, nbytes = self._judged(candidate, quantized)
                step = self._step(index, (*self._verdict(result), nbytes), quantized)
                bar.update()
                bar.set_postfix(point=index, kept=f"{step.params_kept:.1%}", ok=step.feasible)
                return step

            with bar:
                chosen, tried = bisect_index(evaluate, len(self._points), self.budget.steps)
            self.steps += tried
            self.chosen = chosen
            if chosen.feasible or not quantized:
                break
            self.notes.append(f"{self._quantize_label()} alone misses the budget on the calibration part: "
                              "searched again without quantization")
        assert self.chosen is not None
        last = len(self._points) - 1
        if self.chosen.feasible and self.chosen.point == last and self.chosen.quantized:
            self.notes.append(f"the best model within the budget is {self._quantize_label()} alone: "
                              "factoring any layer on top of it crossed the budget")

    def _timed_bound(self, index: int, quantized: bool) -> float:
        """A frontier point's whole model (quantized when asked: what ships) timed against the original at every
        guard batch size: the largest 95% upper prediction bound of the ratio over the batch sizes (see
        :meth:`~onnx_arsvd.results.LatencyComparison.ratio_bound`), so a point the search keeps is within the
        target in the final timing too, not only in the one that chose it."""
        assert self.latency is not None and self._loaded is not None  # __init__ and run() made sure
        candidate = self._candidate()
        apply_plans(candidate, self._plan(self._points[index], candidate).plans)
        source = (self.quantize.apply(candidate, self.scratch).SerializeToString() if quantized and self.quantize
                  else candidate)
        comparisons = self.latency.check_model(model_source(self.model)[0], source, self.latency.provider(),
                                               self.dims, self._loaded)
        return max(c.ratio_bound(Z_95) for c in comparisons)

    def _bisect_latency(self, progress: bool) -> None:
        """The most accurate frontier point whose whole model, timed against the original (interleaved, fresh
        sessions, at every guard batch size), runs within the latency target."""
        target, quantized = self.budget.target_latency, self.quantize is not None
        assert target is not None  # run() calls this for a latency target only
        bar = tqdm(total=self.budget.steps + 1, desc="latency search", unit="step", disable=None if progress else True)

        def evaluate(index: int) -> SearchStep:
            ratio = self._timed_bound(index, quantized)
            step = self._step(index, (ratio, ratio <= target, None), quantized)
            bar.update()
            bar.set_postfix(point=index, kept=f"{step.params_kept:.1%}", latency=f"{ratio:.3f}", ok=step.feasible)
            return step

        with bar:
            self.chosen, self.steps = bisect_index(evaluate, len(self._points), self.budget.steps,
                                                   feasible_above=False)

    def _check_latency_target(self) -> None:
        """With an accuracy budget too: the fastest point within it must also be within the latency target."""
        target, chosen = self.budget.target_latency, self.chosen
        if target is None or chosen is None or chosen.point is None or not chosen.feasible:
            return
        self.latency_bound = self._timed_bound(chosen.point, chosen.quantized)
        if self.latency_bound > target:
            self.chosen = dataclasses.replace(chosen, feasible=False)
            self.notes.append(f"the fastest model within the accuracy budget times at up to "
                              f"{self.latency_bound:.3f}x the original's latency (95% bound): over the target of "
                              f"{target:g}x")

    def _quantize_label(self) -> str:
        """The quantization as the notes name it; asked for only of a search that quantizes."""
        if self.quantize is None:
            raise ValueError("no quantization was asked for: no quantized candidate to describe")
        return self.quantize.describe()

    def _measure_frontier(self, index: int) -> None:
        """Size and quality on the held-out part of: the original, quantization alone, the chosen
        allocation factored, and factored + quantized."""
        dense = len(self._points) - 1
        variants = [("original", dense, False)]
        if self.quantize is not None:
            variants.append((f"{self.quantize.describe()} alone", dense, True))
        variants.append(("factored (chosen ranks)", index, False))
        if self.quantize is not None:
            variants.append((f"factored + {self.quantize.mode}", index, True))
        for label, point, quantized in variants:
            candidate = self._candidate()
            apply_plans(candidate, self._plan(self._points[point], candidate, self._refitted(point)).plans)
            result, nbytes = self._judged(candidate, quantized, held_out=True)
            self.frontier_rows.append(FrontierRow(label, nbytes, self._kept(point),
                                                  min(o.mean_cosine for o in result.outputs), result.accuracy_drop))
        shipped = self.frontier_rows[-1 if self.chosen is not None and self.chosen.quantized else
                                     (2 if self.quantize is not None else 1)]
        drop = shipped.accuracy_drop
        if self.budget.max_drop is not None and drop is not None and drop > self.budget.max_drop:
            self.notes.append(f"MISSED on the held-out part: {shipped.variant} loses "
                              f"{drop:.2f} points (budget {self.budget.max_drop:g})")
        if self.budget.min_cosine is not None and shipped.mean_cosine < self.budget.min_cosine:
            self.notes.append(f"MISSED on the held-out part: {shipped.variant} has mean output cosine "
                              f"{shipped.mean_cosine:.4f} (budget {self.budget.min_cosine:g})")

    # -- one global threshold ----------------------------------------------------------------------------------

    def _run_threshold(self, loaded: ir.Model, settings: Settings, progress: bool) -> SearchOutcome:
        """Decompose every weight once, then bisect the threshold, each step checked in onnxruntime; a weight the
        calibration data never reached stays dense (as in the global allocation)."""
        settings = dataclasses.replace(settings, unreached_dense=True)
        memo = PlanMemo()
        plan_model(loaded, settings, with_factors=False, progress=progress, memo=memo)
        bar = tqdm(total=self.budget.steps + 1, desc="budget search", unit="step", disable=None if progress else True)

        def evaluate(tau: float) -> SearchStep:
            step = self._evaluate_threshold(tau, settings, memo)
            bar.update()
            bar.set_postfix(tau=f"{tau:.4f}", kept=f"{step.params_kept:.1%}", ok=step.feasible)
            return step

        with bar:
            self.chosen, self.steps = bisect_tau(evaluate, self.budget.steps,
                                                 feasible_above=self.budget.target_params is None)
        assert self.chosen.tau is not None
        return SearchOutcome(dataclasses.replace(settings, policy=EnergyPolicy(self.chosen.tau)), memo)

    def _evaluate_threshold(self, tau: float, settings: Settings, memo: PlanMemo) -> SearchStep:
        """One candidate: plan at ``tau``; unless the budget is on parameters alone, build and measure it."""
        candidate = self._candidate()
        planned = plan_model(candidate, dataclasses.replace(settings, policy=EnergyPolicy(tau)), with_factors=True,
                             memo=memo)
        kept = planned.params_kept()
        if self.budget.target_params is not None:
            return SearchStep(tau, kept, None, kept <= self.budget.target_params)
        apply_plans(candidate, planned.plans)
        result, nbytes = self._judged(candidate, self.quantize is not None)
        value, feasible = self._verdict(result)
        return SearchStep(tau, kept, value, feasible, model_bytes=nbytes, quantized=self.quantize is not None)

    # -- what the report shows -------------------------------------------------------------------------------

    def measure_errors(self, loaded: ir.Model, plans: Sequence[WeightPlan], progress: bool = False) -> None:
        """Each factored layer's relative output error on the held-out part's activations."""
        factored = [plan for plan in plans
                    if plan.factored and plan.factors is not None and not plan.layers[0].is_embedding]
        if not factored or self.held_out is None:
            return
        inputs = {k: v for k, v in self.held_out.items() if k != "labels"}
        factors = {plan.layers[0].weight_key: plan.factors for plan in factored if plan.factors is not None}
        errors = output_errors(loaded, [layer for plan in factored for layer in plan.layers], factors, inputs,
                               progress=progress)
        for plan in factored:
            error = errors.get(plan.layers[0].weight_key)
            if error is None:  # used inside an If/Loop/Scan body the data never ran: no activations to measure on
                continue
            plan.decisions = [dataclasses.replace(d, measured_error=error) for d in plan.decisions]

    def summary(self) -> dict[str, object]:
        """What the report shows of the search."""
        samples = {"calibration": sample_count(self.calibration_part), "fit": sample_count(self.fit_part),
                   "held_out": sample_count(self.held_out or {})}
        allocation = self.allocation
        if allocation == "global":
            measured = self._response_reference is not None
            weighting = "measured end-to-end responses" if measured else "relative output errors"
            cost = f", cost: {self._costs.description}" if self._costs is not None else ""
            allocation = f"global (knapsack over every layer's loss curve, {weighting}, ranks in multiples of " \
                         f"{self.budget.rank_multiple}{cost}" + (", refitted sequentially" if self._refits else "") \
                         + ")"
        return {"budget": self.budget.describe(), "measure": self.budget.measure,
                "timed": self.budget.target_latency is not None and not self.budget.judges_outputs,
                "latency_bound": self.latency_bound,
                "met": bool(self.chosen and self.chosen.feasible),
                "tau": self.chosen.tau if self.chosen else None, "samples": samples,
                "allocation": allocation,
                "quantize": self.quantize.describe() if self.quantize is not None else None,
                "steps": [dataclasses.asdict(step) for step in self.steps],
                "frontier": [row.as_dict() for row in self.frontier_rows], "notes": self.notes}
