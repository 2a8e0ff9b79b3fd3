"""Search strategies: each picks a frontier point (or a threshold) and returns the steps it took.

- Parameters (``target_params``): the most accurate point within the parameter target; no model runs.
- Accuracy (``max_drop`` / ``min_cosine``): the frontier is bisected, each point's model judged on the calibration
  part; a point that crosses the budget is rolled back (the search keeps the last point that met it). With
  quantization every candidate is quantized before it is judged; if even quantization alone misses the budget,
  the search runs again without it and says so.
- Latency (``target_latency``): the most accurate point whose whole model, timed against the original at every
  guard batch size, is within the target by a 95% upper prediction bound (the median alone kept points just
  under the target, which the final timing then missed). With an accuracy budget as well, the fastest point
  within it is timed once the same way.
- One threshold (``allocation="threshold"``, and always with l_p factors): one global threshold tau on every
  layer's own output-energy curve, found by bisection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnx_arsvd.config import LatencyGuard
from onnx_arsvd.measure.guard import check_model
from onnx_arsvd.measure.verification import ModelLike, model_source
from onnx_arsvd.methods.lowrank.model_plan import PlanMemo, plan_model
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.methods.quantize.configs import Quantization
from onnx_arsvd.numerics.allocate import best_within
from onnx_arsvd.numerics.rank import EnergyPolicy
from onnx_arsvd.progress import progress_bar
from onnx_arsvd.search.judge import Z_95, Judge
from onnx_arsvd.search.space import AllocationSpace
from onnx_arsvd.search.steps import SearchStep, bisect_index, bisect_tau

__all__ = ["Choice", "by_accuracy", "by_latency", "by_params", "by_threshold", "check_latency_target", "timed_bound"]


@dataclass(frozen=True)
class Choice:
    """What a strategy chose (``chosen``, infeasible when nothing met the budget), every step it took, and its
    notes; ``latency_bound`` is the chosen point's timed latency when a latency target was checked."""

    chosen: SearchStep
    steps: tuple[SearchStep, ...]
    notes: tuple[str, ...] = ()
    latency_bound: float | None = None
    dropped: str = ""
    """Why a requested quantization was dropped (quantization alone missed the budget), or ""."""


def _bar(progress: bool, steps: int, description: str) -> Any:
    return progress_bar(total=steps + 1, desc=description, unit="step", progress=progress)


def _done(bar: Any) -> None:
    """A bisection that stopped before its last step is done all the same: the bar ends at 100%."""
    bar.total = bar.n
    bar.refresh()


def by_params(space: AllocationSpace, target: float, quantized: bool) -> Choice:
    """The most accurate point within ``target`` of the dense parameters (the frontier's predicted loss decides),
    ``quantized`` when a quantization was asked for (nothing is judged that could rule it out)."""
    chosen = best_within(list(space.points), target * space.total - space.fixed)
    index = space.points.index(chosen) if chosen is not None else 0
    step = dataclasses.replace(space.step(index, None, quantized), feasible=chosen is not None)
    return Choice(step, (step,))


def by_accuracy(space: AllocationSpace, judge: Judge, progress: bool) -> Choice:
    """Bisect the frontier with quantization (when the judge quantizes), and without it if quantization alone
    misses the budget."""
    steps: list[SearchStep] = []
    notes: list[str] = []
    dropped = ""
    quantize = judge.quantize
    chosen: SearchStep | None = None
    for quantized in ([True, False] if quantize is not None else [False]):
        bar = _bar(progress, space.budget.steps, "budget search" + (" (quantized)" if quantized else ""))

        def evaluate(index: int, quantized: bool = quantized, bar: Any = bar) -> SearchStep:
            step = space.step(index, judge.judge(space.candidate(index), quantized), quantized)
            bar.update()
            bar.set_postfix(point=index, kept=f"{step.params_kept:.1%}", ok=step.feasible)
            return step

        with bar:
            chosen, tried = bisect_index(evaluate, len(space.points), space.budget.steps)
            _done(bar)
        steps += tried
        if chosen.feasible or not quantized:
            break
        assert quantize is not None  # only a quantizing search tries quantized first
        bound = f"its 95% bound {chosen.value:.6g}; " if chosen.value is not None else ""
        dropped = (f"{quantize.describe()} alone misses the budget on the calibration part ({bound}"
                   f"{space.budget.describe()})")
        notes.append(f"{dropped}: searched again without quantization")
    assert chosen is not None
    if chosen.feasible and chosen.point == space.dense_point and chosen.quantized and quantize is not None:
        notes.append(f"the best model within the budget is {quantize.describe()} alone: "
                     "factoring any layer on top of it crossed the budget")
    return Choice(chosen, tuple(steps), tuple(notes), dropped=dropped)


def timed_bound(space: AllocationSpace, index: int, original: ModelLike, latency: LatencyGuard,
                quantize: Quantization | None, scratch: Path | None, dims: Mapping[str, int]) -> float:
    """A point's whole model (quantized with ``quantize``: what ships) timed against the original at every guard
    batch size: the largest 95% upper prediction bound of the ratio over the batch sizes (see
    :meth:`~onnx_arsvd.measure.results.LatencyComparison.ratio_bound`), so a point the search keeps is within the target
    in the final timing too, not only in the one that chose it."""
    candidate = space.candidate(index, refitted=False)
    source = quantize.apply(candidate, scratch).SerializeToString() if quantize is not None else candidate
    comparisons = check_model(latency, model_source(original)[0], source, latency.provider(), dims, space.model)
    return max(c.ratio_bound(Z_95) for c in comparisons)


def by_latency(space: AllocationSpace, target: float, timed: Callable[[int], float], quantized: bool,
               progress: bool) -> Choice:
    """The most accurate point whose whole model (``timed``: its latency bound) runs within ``target``."""
    bar = _bar(progress, space.budget.steps, "latency search")

    def evaluate(index: int) -> SearchStep:
        ratio = timed(index)
        step = space.step(index, (ratio, ratio <= target, None), quantized)
        bar.update()
        bar.set_postfix(point=index, kept=f"{step.params_kept:.1%}", latency=f"{ratio:.3f}", ok=step.feasible)
        return step

    with bar:
        chosen, steps = bisect_index(evaluate, len(space.points), space.budget.steps, feasible_above=False)
        _done(bar)
    return Choice(chosen, tuple(steps))


def check_latency_target(choice: Choice, target: float, timed: Callable[[int], float]) -> Choice:
    """With an accuracy budget too: the fastest point within it must also be within the latency target."""
    chosen = choice.chosen
    if chosen.point is None or not chosen.feasible:
        return choice
    bound = timed(chosen.point)
    if bound <= target:
        return dataclasses.replace(choice, latency_bound=bound)
    note = (f"the fastest model within the accuracy budget times at up to {bound:.3f}x the original's latency "
            f"(95% bound): over the target of {target:g}x")
    return dataclasses.replace(choice, chosen=dataclasses.replace(chosen, feasible=False),
                               notes=(*choice.notes, note), latency_bound=bound)


def by_threshold(loaded: ir.Model, settings: Settings, judge: Judge | None, target_params: float | None,
                 steps: int, progress: bool, quantizing: bool = False) -> tuple[Choice, Settings, PlanMemo]:
    """Decompose every weight once, then bisect one output-energy threshold: to ``target_params`` by the plan's
    parameters alone (``quantizing``: a requested quantization applies), else each step's model checked by
    ``judge``. A weight the calibration data never reached stays dense (as in the global allocation). The settings
    with the chosen threshold, and the memo that holds the spectra."""
    settings = dataclasses.replace(settings, unreached_dense=True)
    memo = PlanMemo()
    plan_model(loaded, settings, with_factors=False, progress=progress, memo=memo)
    bar = _bar(progress, steps, "budget search")

    def evaluate(tau: float) -> SearchStep:
        candidate = loaded.clone()
        planned = plan_model(candidate, dataclasses.replace(settings, policy=EnergyPolicy(tau)), with_factors=True,
                             memo=memo)
        kept = planned.params_kept()
        if target_params is not None:  # nothing judged that could rule a requested quantization out
            step = SearchStep(tau, kept, None, kept <= target_params, quantized=quantizing)
        else:
            assert judge is not None  # an accuracy budget has its judge
            quantized = judge.quantize is not None
            apply_plans(candidate, planned.plans)
            value, feasible, nbytes = judge.judge(candidate, quantized)
            step = SearchStep(tau, kept, value, feasible, model_bytes=nbytes, quantized=quantized)
        bar.update()
        bar.set_postfix(tau=f"{tau:.4f}", kept=f"{step.params_kept:.1%}", ok=step.feasible)
        return step

    with bar:
        chosen, tried = bisect_tau(evaluate, steps, feasible_above=target_params is None)
        _done(bar)
    assert chosen.tau is not None
    return Choice(chosen, tuple(tried)), dataclasses.replace(settings, policy=EnergyPolicy(chosen.tau)), memo
