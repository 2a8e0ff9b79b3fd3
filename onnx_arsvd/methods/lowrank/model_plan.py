"""Plan a whole model: find its layers, filter them, calibrate, and plan every weight.

The result is one stage value, :class:`ModelPlan`, that the guard, the budget search, the rewrite
and the report read; a :class:`PlanMemo` lets successive plans of one model (the budget search's
steps) share Gram matrices and spectra instead of recomputing them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import UnsupportedModelError
from onnx_arsvd.graph.layers import Layer, Skipped, WeightKey, filter_layers, find_layers
from onnx_arsvd.measure.calibration import capture_grams
from onnx_arsvd.methods.lowrank.decision import LayerDecision, dense_decision
from onnx_arsvd.methods.lowrank.plan import WeightPlan, plan_layers
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.numerics.factorize import Spectrum

if TYPE_CHECKING:
    from onnx_arsvd.io.spill import Spill
    from onnx_arsvd.methods.width.rewrite import WidthPlan

__all__ = ["HEAD_REASON", "UNREACHED_REASON", "LayerSelection", "ModelPlan", "PlanMemo", "feeds_graph_output",
           "plan_model", "select_layers"]

HEAD_REASON = "feeds a graph output (a head): kept dense without real data to check it (give `data`, or `factor_heads`)"
UNREACHED_REASON = "the calibration data never reached it (a branch not taken): kept dense, nothing could judge it"

_TOWARD_OUTPUT = frozenset({
    # elementwise
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal", "Erf", "Tanh",
    "Sigmoid", "HardSigmoid", "Relu", "LeakyRelu", "Clip", "Where", "Cast", "Identity",
    # normalising (every spelling of a softmax among them: ReduceMax, Sub, Exp, ReduceSum, Div)
    "Softmax", "LogSoftmax", "ReduceMax", "ReduceSum", "ReduceMean", "ReduceLogSumExp", "LayerNormalization",
    "BatchNormalization", "InstanceNormalization", "LpNormalization",
    # shape
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Expand",
})
"""Ops between a layer's product and a graph output that leave it the model's answer: elementwise, normalising and
shape ops, but no other layer."""


def _constant(value: ir.Value | None) -> bool:
    if value is None or value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def feeds_graph_output(node: ir.Node) -> bool:
    """Whether the node's output is a graph output, or becomes one through elementwise, normalising or shape ops
    that combine it only with itself and constants (a bias, a softmax in any spelling: ReduceMax, Sub, Exp,
    ReduceSum, Div): a head, whose truncation shows in the answer directly. A residual ``Add`` that mixes in
    another branch ends the path: a layer writing to a transformer's residual stream is no head."""
    values = list(node.outputs)
    derived = {id(value) for value in values}
    done: set[int] = set()
    changed = True
    while changed:  # each op is taken once, when every input it has is derived or constant
        changed = False
        for value in list(values):
            for user, _ in value.uses():
                if (id(user) in done or user.op_type not in _TOWARD_OUTPUT
                        or not all(id(v) in derived or _constant(v) for v in user.inputs)):
                    continue
                done.add(id(user))
                derived.update(id(out) for out in user.outputs)
                values.extend(user.outputs)
                changed = True
    return any(value.is_graph_output() for value in values)


@dataclass
class PlanMemo:
    """What successive plans of one model share, keyed by weight: Gram matrices and spectra."""

    grams: dict[WeightKey, np.ndarray] | None = None
    spectra: dict[WeightKey, Spectrum] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelPlan:
    """Plans of the layers considered, the layers excluded by name, nodes skipped, and the graph order (a node's
    position by ``id``); ``narrowed``: the width units a search narrowed (their weights have no plan in ``plans``).
    A later stage that changes the plans makes a new value (:meth:`with_plans`)."""

    plans: tuple[WeightPlan, ...]
    excluded: tuple[tuple[Layer, LayerDecision], ...]
    skipped: tuple[Skipped, ...]
    order: Mapping[int, int]
    notes: tuple[str, ...] = ()
    narrowed: tuple[WidthPlan, ...] = ()

    def with_plans(self, plans: Sequence[WeightPlan]) -> ModelPlan:
        return dataclasses.replace(self, plans=tuple(plans))

    def without_factors(self) -> ModelPlan:
        """The plan without factors (once they are in the graph: the report reads only the decisions)."""
        return self.with_plans([plan.without_factors() for plan in self.plans])

    def decisions(self) -> list[LayerDecision]:
        """Every layer's decision, in graph order."""
        rows = [(layer, decision) for plan in self.plans
                for layer, decision in zip(plan.layers, plan.decisions, strict=True)]
        rows += self.excluded
        rows += [row for plan in self.narrowed for row in zip(plan.layers, plan.decisions, strict=True)]
        rows.sort(key=lambda row: self.order[id(row[0].node)])
        return [decision for _, decision in rows]

    def params_kept(self) -> float:
        """Share of the dense layers' parameters the plan keeps, each weight once (embedding tables apart)."""
        firsts = [(plan.layers[0], plan.decisions[0]) for plan in self.plans] + list(self.excluded)
        decisions = [decision for layer, decision in firsts if not layer.is_embedding]
        decisions += [decision for plan in self.narrowed for decision in plan.decisions]
        return sum(d.params_after for d in decisions) / sum(d.params for d in decisions) if decisions else 1.0


def _keep_dense(plans: Sequence[WeightPlan], keys: set[WeightKey], reason: str) -> list[WeightPlan]:
    """The plans with every weight of ``keys`` that would be factored left dense, for ``reason``."""
    return [plan.kept_dense(reason) if plan.factored and plan.layers[0].weight_key in keys else plan
            for plan in plans]


def _keep_heads_dense(plans: Sequence[WeightPlan]) -> list[WeightPlan]:
    """The plans with every weight that would be factored but feeds a graph output (a classifier head) left dense."""
    heads = {plan.layers[0].weight_key for plan in plans
             if not plan.layers[0].is_embedding and any(feeds_graph_output(layer.node) for layer in plan.layers)}
    return _keep_dense(plans, heads, HEAD_REASON)


def no_layer_message(skipped: Sequence[Skipped]) -> str:
    """One line: no factorable layer, and every reason a node was passed over (with up to 3 node names each)."""
    by_reason: dict[str, list[str]] = {}
    for node in skipped:
        by_reason.setdefault(f"{node.op_type}: {node.reason}", []).append(node.name)
    reasons = []
    for reason, names in by_reason.items():
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        reasons.append(f"{reason} ({', '.join(repr(n) for n in names[:3])}{more})")
    return ("no factorable layer (MatMul/Gemm/Gather with a 2-D float constant weight)"
            + (f"; passed over: {'; '.join(reasons)}" if reasons else "; the model has no MatMul, Gemm or Gather"))


@dataclass(frozen=True)
class LayerSelection:
    """A model's layers sorted by what happens to them, before any weight is decomposed."""

    dense: list[Layer]
    embeddings: list[Layer]
    excluded: list[tuple[Layer, str]]
    skipped: list[Skipped]
    order: dict[int, int]


def select_layers(model: ir.Model, settings: Settings, *, allow_empty: bool = False) -> LayerSelection:
    """Find the factorable layers; set aside those excluded by name (and embedding tables without a policy)."""
    layers, skipped = find_layers(model)
    if not layers and not allow_empty:
        raise UnsupportedModelError(no_layer_message(skipped))
    considered, excluded = filter_layers(layers, settings.include, settings.exclude)
    dense = [layer for layer in considered if not layer.is_embedding]
    embeddings = [layer for layer in considered if layer.is_embedding]
    if settings.embedding_policy is None:
        excluded += [(layer, "embedding table: factored only with an `embedding_policy`") for layer in embeddings]
        embeddings = []
    order = {id(layer.node): index for index, layer in enumerate(layers)}
    return LayerSelection(dense, embeddings, excluded, skipped, order)


def plan_model(
    model: ir.Model, settings: Settings, *, with_factors: bool, progress: bool = False, memo: PlanMemo | None = None,
    allow_empty: bool = False, spill: Spill | None = None,
) -> ModelPlan:
    """Every layer's plan under ``settings``; a model without any layer is an error unless ``allow_empty``.

    Whitened plans capture their Gram matrices unless ``memo`` has them; a ``memo`` also keeps every
    spectrum, so later plans of the same model (reloads included) decompose no weight again. A ``spill``
    takes every weight's factors to disk as soon as they are made (:func:`onnx_arsvd.methods.lowrank.plan.plan_layers`).
    """
    selection = select_layers(model, settings, allow_empty=allow_empty)
    dense, embeddings, excluded = selection.dense, selection.embeddings, selection.excluded
    grams = memo.grams if memo is not None else None
    if settings.method == "whitened" and dense and grams is None and settings.calibration is not None:
        grams = capture_grams(model, dense, settings.calibration, progress=progress)
        if memo is not None:
            memo.grams = grams
    plan = functools.partial(plan_layers, max_rank_fraction=settings.max_rank_fraction,
                             min_params=settings.min_params, with_factors=with_factors,
                             cache=memo.spectra if memo is not None else None, progress=progress, jobs=settings.jobs,
                             spill=spill,
                             lp_power=settings.lp_power if settings.method == "lp" else None)
    plans = plan(dense, settings.policy, grams=grams if settings.method == "whitened" else None)
    if embeddings and settings.embedding_policy is not None:  # a lookup has no activations to whiten
        plans += plan(embeddings, settings.embedding_policy)
    if not settings.factor_heads:
        plans = _keep_heads_dense(plans)
    notes = []
    if (settings.method == "whitened" and grams is not None
            and (unseen := {layer.weight_key for layer in dense} - set(grams))):
        if settings.unreached_dense:
            plans = _keep_dense(plans, unseen, UNREACHED_REASON)
        notes.append(f"note: no activations were captured for {len(unseen)} weight(s) (an If branch the data never "
                     "takes, or a loop body whose activations change shape between iterations); they "
                     f"{'stay dense' if settings.unreached_dense else 'got plain SVD factors'}: "
                     f"{', '.join(sorted(key[0] for key in unseen))}")
    return ModelPlan(tuple(plans), tuple((layer, dense_decision(layer, reason)) for layer, reason in excluded),
                     tuple(selection.skipped), selection.order, tuple(notes))
