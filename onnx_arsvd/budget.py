"""Rank selection under a budget: the fewest parameters that keep accuracy, without retraining.

The data is split once: a calibration part (input Gram matrices for whitened factors, and the
end-to-end checks that choose the ranks) and a held-out part, never used to choose, on which the
result is reported. Every layer's rank comes from one global threshold tau on its own *output*
energy curve (with whitened factors, s_i^2 of L^T W is the layer's output energy on the
calibration data), so sensitive layers keep more rank and robust ones less; tau is found by
bisection: the smallest tau whose model meets the budget on the calibration part. An accuracy
budget is judged by the one-sided 95% upper confidence bound of the drop, a cosine budget by the
lower bound of the mean cosine, not by the point estimates:
a search that stops exactly at the budget on one sample overshoots it on another about half the time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from tqdm.auto import tqdm

from onnx_arsvd.calibration import capture_grams
from onnx_arsvd.candidates import read_array
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.model_io import to_model
from onnx_arsvd.model_plan import PlanMemo, plan_model
from onnx_arsvd.plan import WeightPlan, relative_output_error
from onnx_arsvd.rank import EnergyPolicy
from onnx_arsvd.rewrite import apply_plans
from onnx_arsvd.sessions import make_session
from onnx_arsvd.settings import CalibrationSource, Settings
from onnx_arsvd.verification import (
    ModelLike,
    compare_models,
    load_arrays,
    load_data,
    load_labels,
    model_source,
    split_batches,
)

__all__ = ["Budget", "BudgetSearch", "SearchOutcome", "SearchStep", "bisect_tau", "split_data"]


@dataclass(frozen=True)
class Budget:
    """One of: at most ``max_drop`` accuracy points lost (needs labels), a mean output cosine of at
    least ``min_cosine``, or at most ``target_params`` of the dense parameters kept."""

    max_drop: float | None = None
    min_cosine: float | None = None
    target_params: float | None = None
    holdout: float = 0.4
    seed: int = 0
    steps: int = 12

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.max_drop, self.min_cosine, self.target_params)]
        if sum(given) != 1:
            raise InvalidInputError("give exactly one budget: --max-drop, --min-cosine or --target-params")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise InvalidInputError(f"--max-drop must be a non-negative number of points, got {self.max_drop}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise InvalidInputError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise InvalidInputError(f"--target-params must be in (0, 1], got {self.target_params}")
        if not 0.0 < self.holdout < 1.0:
            raise InvalidInputError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.steps < 1:
            raise InvalidInputError(f"search steps must be at least 1, got {self.steps}")

    @property
    def needs_data(self) -> bool:
        return self.target_params is None

    @property
    def measure(self) -> str | None:
        """What each search step measures in onnxruntime; None when parameters alone decide."""
        if self.max_drop is not None:
            return "accuracy drop, 95% upper bound (points)"
        return "mean output cosine, 95% lower bound" if self.min_cosine is not None else None

    def describe(self) -> str:
        if self.max_drop is not None:
            return f"at most {self.max_drop:g} accuracy points lost"
        if self.min_cosine is not None:
            return f"mean output cosine at least {self.min_cosine:g}"
        return f"at most {self.target_params:.1%} of the dense parameters"


@dataclass(frozen=True)
class SearchStep:
    """One candidate of the search: its threshold, dense parameters kept, measured value, verdict."""

    tau: float
    params_kept: float
    value: float | None
    feasible: bool


def split_data(arrays: Mapping[str, np.ndarray], holdout: float, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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


@dataclass(frozen=True)
class SearchOutcome:
    """The settings with the chosen threshold, and the memo of Gram matrices and spectra the search filled."""

    settings: Settings
    memo: PlanMemo


class BudgetSearch:
    """Splits the data, then finds the energy threshold whose model meets the budget with fewest parameters."""

    def __init__(
        self,
        model: ModelLike,
        budget: Budget,
        data: str | os.PathLike | Mapping[str, np.ndarray] | None,
        labels: np.ndarray | str | os.PathLike | None,
        method: str,
        calibration: CalibrationSource | None,
    ) -> None:
        self.model, self.budget = model, budget
        self.calibration_part: dict[str, np.ndarray] = {}
        self.held_out: dict[str, np.ndarray] | None = None
        self.steps: list[SearchStep] = []
        self.chosen: SearchStep | None = None
        if budget.needs_data and data is None:
            raise InvalidInputError("an accuracy budget needs --data: inputs (and labels) to split and measure")
        if data is not None:  # a parameter budget uses data too: to calibrate, and to verify on the held-out part
            arrays = load_arrays(data)
            if labels is not None:
                arrays["labels"] = load_labels(labels) if isinstance(labels, (str, os.PathLike)) else np.asarray(labels)
            if budget.max_drop is not None and "labels" not in arrays:
                raise InvalidInputError("--max-drop needs labels (a 'labels' array in --data, or --labels)")
            self.calibration_part, self.held_out = split_data(arrays, budget.holdout, budget.seed)
        if method == "whitened" and calibration is None and not self.calibration_part:
            raise InvalidInputError("--method whitened needs calibration inputs (--calibration or --data)")
        self.calibration: CalibrationSource | None = (
            calibration if calibration is not None else (self.calibration_part or None))

    def run(self, loaded: ir.Model, settings: Settings, progress: bool = False) -> SearchOutcome:
        """Decompose every weight once, then bisect the threshold, each step checked in onnxruntime."""
        memo = PlanMemo()
        plan_model(loaded, settings, with_factors=False, progress=progress, memo=memo)
        judge = make_session(model_source(self.model)[0]) if self.budget.needs_data else None
        batches = list(split_batches(load_data(self.calibration_part, judge)[0], judge, 256)) if judge else []
        bar = tqdm(total=self.budget.steps + 1, desc="budget search", unit="step", disable=None if progress else True)

        def evaluate(tau: float) -> SearchStep:
            step = self._evaluate(tau, settings, memo, judge, batches)
            bar.update()
            bar.set_postfix(tau=f"{tau:.4f}", kept=f"{step.params_kept:.1%}", ok=step.feasible)
            return step

        with bar:
            self.chosen, self.steps = bisect_tau(evaluate, self.budget.steps,
                                                 feasible_above=self.budget.target_params is None)
        return SearchOutcome(dataclasses.replace(settings, policy=EnergyPolicy(self.chosen.tau)), memo)

    def _evaluate(self, tau: float, settings: Settings, memo: PlanMemo, judge, batches: Sequence) -> SearchStep:
        """One candidate: plan at ``tau``; unless the budget is on parameters alone, build and measure it."""
        candidate = to_model(self.model)
        planned = plan_model(candidate, dataclasses.replace(settings, policy=EnergyPolicy(tau)), with_factors=True,
                             memo=memo)
        kept = planned.params_kept()
        if self.budget.target_params is not None:
            return SearchStep(tau, kept, None, kept <= self.budget.target_params)
        apply_plans(candidate, planned.plans)
        result = compare_models(judge, make_session(ir.to_proto(candidate).SerializeToString()), batches,
                                labels=self.calibration_part.get("labels"))
        if self.budget.max_drop is not None:  # the drop's 95% upper bound, so held-out data meets it too
            bound = result.accuracy_drop_bound()
            return SearchStep(tau, kept, bound, bound is not None and bound <= self.budget.max_drop)
        cosine = min(o.cosine_bound() for o in result.outputs)  # 95% lower bound, as for --max-drop
        return SearchStep(tau, kept, cosine, cosine >= (self.budget.min_cosine or 0.0))

    def measure_errors(self, loaded: ir.Model, plans: Sequence[WeightPlan], progress: bool = False) -> None:
        """Each factored layer's relative output error on the held-out part's activations."""
        factored = [plan for plan in plans
                    if plan.factored and plan.factors is not None and not plan.layers[0].is_embedding]
        if not factored or self.held_out is None:
            return
        inputs = {k: v for k, v in self.held_out.items() if k != "labels"}
        grams = capture_grams(loaded, [layer for plan in factored for layer in plan.layers], inputs, progress=progress)
        for plan in factored:
            first = plan.layers[0]
            matrix = read_array(first.weight)
            assert plan.factors is not None  # filtered above
            error = relative_output_error(matrix.T if first.transposed else matrix, plan.factors,
                                          grams[first.weight_key])
            plan.decisions = [dataclasses.replace(d, measured_error=error) for d in plan.decisions]

    def summary(self) -> dict[str, object]:
        """What the report shows of the search."""
        samples = {name: len(next(iter(part.values()))) if part else 0
                   for name, part in (("calibration", self.calibration_part), ("held_out", self.held_out or {}))}
        return {"budget": self.budget.describe(), "measure": self.budget.measure,
                "met": bool(self.chosen and self.chosen.feasible),
                "tau": self.chosen.tau if self.chosen else None, "samples": samples,
                "steps": [dataclasses.asdict(step) for step in self.steps]}
