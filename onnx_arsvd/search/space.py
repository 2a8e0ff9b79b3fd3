"""The global allocation's frontier over one model, built once: every candidate of a search is a point on it.

Every weight is decomposed once into its loss curve (output error at every rank,
:mod:`onnx_arsvd.numerics.losscurve`); each layer's end-to-end gain is measured once
(:mod:`onnx_arsvd.measure.sensitivity`); the knapsack frontier of (cost, predicted loss) over every layer's ranks
and "dense" (:mod:`onnx_arsvd.numerics.allocate`) is then what the strategies (:mod:`onnx_arsvd.search.strategies`)
search. With ``width``, the hidden layers' widths (:mod:`onnx_arsvd.methods.width`) join the same knapsack as
alternatives to factoring the weights they claim. The
weights the calibration data cannot judge are kept dense and out of the frontier.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import WeightKey
from onnx_arsvd.measure.calibration import curve_grams, input_moments
from onnx_arsvd.measure.guard import LatencyTable, observed_rows
from onnx_arsvd.measure.latency_cost import LatencyCosts, latency_costs
from onnx_arsvd.measure.sensitivity import DEFAULT_PROBES, Response, layer_responses, width_responses
from onnx_arsvd.methods.lowrank.curves import WeightCurve, weight_curves
from onnx_arsvd.methods.lowrank.decision import LayerDecision, dense_decision
from onnx_arsvd.methods.lowrank.method import LowRank, LowRankStatistics
from onnx_arsvd.methods.lowrank.model_plan import (
    HEAD_REASON,
    UNREACHED_REASON,
    LayerSelection,
    ModelPlan,
    PlanMemo,
    feeds_graph_output,
    select_layers,
)
from onnx_arsvd.methods.lowrank.plan import plan_layers
from onnx_arsvd.methods.lowrank.sequential import sequential_factors
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.method import UnitCurve, Width, unit_curves
from onnx_arsvd.numerics.allocate import DENSE, Allocation, LayerOptions, frontier, param_cost
from onnx_arsvd.numerics.choices import group_overlapping
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.parts import Feeds, first_samples
from onnx_arsvd.search.steps import SearchStep

__all__ = ["SILENT_REASON", "AllocationSpace", "allocation_space"]

SILENT_REASON = "factoring it changed no output on the calibration data: kept dense, nothing could judge it"

Factors = Mapping[WeightKey, tuple[np.ndarray, np.ndarray]]


def _select(model: ir.Model, settings: Settings, unjudged: Mapping[WeightKey, str]) -> LayerSelection:
    """The model's layers; set aside, dense: the weights the data cannot judge, and without ``factor_heads`` the
    layers feeding a graph output."""
    selection = select_layers(model, settings)
    aside = [(layer, reason) for layer in selection.dense if (reason := unjudged.get(layer.weight_key))]
    if not settings.factor_heads:
        aside += [(layer, HEAD_REASON) for layer in selection.dense
                  if feeds_graph_output(layer.node) and layer.weight_key not in unjudged]
    if not aside:
        return selection
    kept = {id(layer) for layer, _ in aside}
    return dataclasses.replace(selection, dense=[layer for layer in selection.dense if id(layer) not in kept],
                               excluded=selection.excluded + aside)


@dataclass(frozen=True)
class AllocationSpace:
    """The frontier (``points``, cheapest first, all-dense last) and what turns a point into a model.

    ``total`` is the dense layers' parameters (as the report counts them), ``fixed`` those of the layers the
    allocation does not choose (kept at their decision whatever the point). ``refits`` memoizes, per point,
    the factors refitted layer by layer when the budget asks for sequential refits.
    """

    model: ir.Model
    settings: Settings
    budget: Budget
    curves: tuple[WeightCurve, ...]
    unjudged: Mapping[WeightKey, str]
    points: tuple[Allocation, ...]
    total: float
    fixed: float
    costs: LatencyCosts | None
    responses_measured: bool
    memo: PlanMemo
    fit_batches: list = field(default_factory=list)
    refits: dict[int, Factors] = field(default_factory=dict)
    widths: tuple[UnitCurve, ...] = ()
    """The width units the allocation may narrow (alternatives to factoring the weights they claim)."""

    @property
    def dense_point(self) -> int:
        return len(self.points) - 1

    @property
    def method(self) -> LowRank:
        return LowRank(self.settings, self.budget.rank_multiple)

    def plan(self, index: int, model: ir.Model, *, refitted: bool = True) -> ModelPlan:
        """The plan of ``model`` (the original or a fresh copy: weights are matched by key) at a point; embedding
        tables by their policy; with ``refitted``, the point's sequential refits when the budget asks for them."""
        selection = _select(model, self.settings, self.unjudged)
        factors = self.refitted(index) if refitted else None
        settings = self.points[index].ranks
        narrowed = Width(self.budget.rank_multiple).plan(model, settings, self.widths)
        claimed = self._claimed(index)
        plans = [plan for plan in self.method.plan(model, settings, self.curves, factors)
                 if plan.layers[0].weight_key not in claimed]
        if selection.embeddings and self.settings.embedding_policy is not None:
            plans += plan_layers(selection.embeddings, self.settings.embedding_policy,
                                 max_rank_fraction=self.settings.max_rank_fraction,
                                 min_params=self.settings.min_params, cache=self.memo.spectra)
        excluded = tuple((layer, dense_decision(layer, reason)) for layer, reason in selection.excluded)
        return ModelPlan(tuple(plans), excluded, tuple(selection.skipped), selection.order,
                         narrowed=tuple(narrowed))

    def _claimed(self, index: int) -> set[WeightKey]:
        """The weights of the width units a point narrows."""
        settings = self.points[index].ranks
        return {key for c in self.widths if settings.get(c.key, DENSE) != DENSE for key in c.claims}

    def candidate(self, index: int, *, refitted: bool = True) -> ir.Model:
        """A clone of the model rewritten at a point: it shares the original's weights, so no candidate reloads
        or copies them."""
        candidate = self.model.clone()
        planned = self.plan(index, candidate, refitted=refitted)
        Width(self.budget.rank_multiple).rewrite(planned.narrowed)(candidate)
        self.method.rewrite(planned.plans)(candidate)
        return candidate

    def refitted(self, index: int) -> Factors | None:
        """With ``sequential``, the point's factors refitted layer by layer (once per point)."""
        if not self.budget.sequential or not self.fit_batches:
            return None
        if index not in self.refits:
            self.refits[index] = sequential_factors(self.model.clone(), list(self.curves), self.points[index],
                                                    self.fit_batches)
        return self.refits[index]

    def kept(self, index: int) -> float:
        """Share of the dense parameters a point keeps."""
        ranks, claimed = self.points[index].ranks, self._claimed(index)
        allocated = sum(param_cost(c.curve.shape, ranks.get(c.key, DENSE)) for c in self.curves
                        if c.key not in claimed)
        allocated += sum(c.unit.params(ranks[c.key]) for c in self.widths if ranks.get(c.key, DENSE) != DENSE)
        return (allocated + self.fixed) / self.total

    def step(self, index: int, measured: tuple[float | None, bool, int | None] | None, quantized: bool) -> SearchStep:
        """The search step of a point: its share kept, predicted loss and latency share, and what was measured."""
        value, feasible, nbytes = measured if measured is not None else (None, True, None)
        point, dense = self.points[index], self.points[-1]
        latency = point.cost / dense.cost if self.costs is not None and dense.cost > 0 else None
        return SearchStep(None, self.kept(index), value, feasible, index, point.loss, nbytes, quantized, latency)

    def describe(self) -> str:
        """The allocation, as the report names it."""
        weighting = "measured end-to-end responses" if self.responses_measured else "relative output errors"
        cost = f", cost: {self.costs.description}" if self.costs is not None else ""
        refits = ", refitted sequentially" if self.refits else ""
        widths = (f", and the widths of {len(self.widths)} hidden layer(s) (units removed, the next product refitted)"
                  if self.widths else "")
        return (f"global (knapsack over every layer's loss curve{widths}, {weighting}, ranks in multiples of "
                f"{self.budget.rank_multiple}{cost}{refits})")


def _options(curves: list[WeightCurve], settings: Settings, budget: Budget, costs: LatencyCosts | None,
             responses: Mapping[WeightKey, Response] | None) -> list[LayerOptions]:
    statistics = LowRankStatistics(curves, responses, costs.costs if costs is not None else None)
    return LowRank(settings, budget.rank_multiple).options(curves, statistics)


def _unjudged(curves: list[WeightCurve], reached: set[WeightKey] | None,
              responses: Mapping[WeightKey, Response]) -> dict[WeightKey, str]:
    """The weights the calibration data cannot judge: those whose layers it never reached (a branch not taken: no
    input Gram) and those whose factoring changed no output on it (a response of 0). Their predicted loss would be 0
    at any rank, so the allocation would factor them to the least rank for free, and no end-to-end check on this
    data would see the damage."""
    unjudged = {}
    for c in curves:
        if reached is not None and c.key not in reached:
            unjudged[c.key] = UNREACHED_REASON
        elif c.key in responses and responses[c.key].scale == 0:
            unjudged[c.key] = SILENT_REASON
    return unjudged


def allocation_space(model: ir.Model, settings: Settings, budget: Budget, data: Feeds | None, *,
                     latency: LatencyTable | None, dims: Mapping[str, int], progress: bool) -> AllocationSpace:
    """Decompose every weight of ``model`` once, measure the layers' responses (with ``data``'s response
    references) and, when the budget prices latency, every rank's latency; the frontier over what remains."""
    selection = _select(model, settings, {})
    grams = None
    if settings.method == "whitened" and selection.dense:
        if settings.calibration is None:  # Settings refuses the whitened method without calibration inputs
            raise ValueError("whitened settings without calibration inputs")
        grams = curve_grams(model, selection.dense, settings.calibration, progress=progress)
    reached = set(grams) if grams is not None else None
    # the curves hold all the search needs: each Gram (float64, m x m) is dropped once its curve is made
    curves = weight_curves(selection.dense, grams, progress=progress, jobs=settings.jobs, release=True,
                           max_rank_fraction=settings.max_rank_fraction, probes=DEFAULT_PROBES)
    del grams
    costs = None
    if budget.prices_latency:
        assert latency is not None and data is not None  # the search checked both
        layers = [layer for c in curves for layer in c.layers]
        rows = observed_rows(model, layers, first_samples(data.judge, 8, data.per_call)[0])
        costs = latency_costs(curves, latency, latency.guard.provider(), rows, dims, multiple=budget.rank_multiple,
                              max_rank_fraction=settings.max_rank_fraction, min_params=settings.min_params,
                              progress=progress)
    responses: Mapping[WeightKey, Response] = {}
    if data is not None and data.response_reference is not None and data.response is not None:
        choosing = [c for c, o in zip(curves, _options(curves, settings, budget, costs, None), strict=True)
                    if len(o.choices) > 1]
        responses = layer_responses(model, choosing, data.response, progress=progress,
                                    reference=data.response_reference)
    unjudged = _unjudged(curves, reached, responses)
    curves = [c for c in curves if c.key not in unjudged]
    widths = (_width_curves(model, selection, curves, settings, data.judge if data is not None else None, progress)
              if settings.width and reached is not None and costs is None and not budget.sequential else [])
    narrowing: Mapping[Hashable, Response] = {}
    if widths and responses:
        assert data is not None and data.response is not None  # responses were measured on it
        narrowing = width_responses(model, widths, data.response, multiple=budget.rank_multiple, progress=progress,
                                    reference=data.response_reference)
    options = _options(curves, settings, budget, costs, responses)
    width_options = Width(budget.rank_multiple).options(widths, narrowing)
    claims: dict[Hashable, frozenset[Hashable]] = {**{c.key: c.claims for c in curves},
                                                   **{c.key: c.claims for c in widths}}
    dense: dict[Hashable, float] = {c.key: float(np.prod(c.curve.shape)) for c in curves}
    grouping = group_overlapping([*options, *width_options], claims, dense)
    points = tuple(grouping.expand(point) for point in frontier(grouping.options))
    space = AllocationSpace(model, settings, budget, tuple(curves), unjudged, points, total=1.0, fixed=0.0,
                            costs=costs, responses_measured=data is not None and data.response_reference is not None,
                            memo=PlanMemo(), fit_batches=data.fit if data is not None else [], widths=tuple(widths))
    total = sum(d.params for d in _dense_decisions(space, space.dense_point))
    fixed = sum(d.params_after for d in _dense_decisions(space, 0, outside=True))
    return dataclasses.replace(space, total=total, fixed=fixed)


def _width_curves(model: ir.Model, selection: LayerSelection, curves: list[WeightCurve], settings: Settings,
                  judged: list | None, progress: bool) -> list[UnitCurve]:
    """The loss curves of the width units whose every weight the allocation chooses (none set aside): fitted on
    the fit part, their errors measured out of sample on the judged part when it is another."""
    chosen = {c.key for c in curves}
    units = [unit for unit in find_width_units(selection.dense)[0] if unit.claims <= chosen]
    if not units:
        return []
    assert settings.calibration is not None  # widths are offered with whitened curves, which have calibration
    exits = [unit.exit for unit in units]
    moments = input_moments(model, exits, settings.calibration, progress=progress)
    check = input_moments(model, exits, judged, progress=progress) if judged else None
    return unit_curves(units, moments, check)


def _dense_decisions(space: AllocationSpace, index: int, outside: bool = False) -> list[LayerDecision]:
    """Each dense layer's decision at a point, a shared weight once, embedding tables apart (as the report and
    :meth:`ModelPlan.params_kept` count); with ``outside``, only the layers the allocation does not choose."""
    chosen = {c.key for c in space.curves} if outside else set()
    planned = space.plan(index, space.model, refitted=False)
    firsts = [(plan.layers[0], plan.decisions[0]) for plan in planned.plans] + list(planned.excluded)
    return [d for layer, d in firsts if not layer.is_embedding and layer.weight_key not in chosen]
