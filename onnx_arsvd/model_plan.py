"""Plan a whole model: find its layers, filter them, calibrate, and plan every weight.

The result is one stage value, :class:`ModelPlan`, that the guard, the budget search, the rewrite
and the report read; a :class:`PlanMemo` lets successive plans of one model (the budget search's
steps) share Gram matrices and spectra instead of recomputing them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnx_arsvd.calibration import capture_grams
from onnx_arsvd.candidates import Layer, Skipped, WeightKey, filter_layers, find_layers
from onnx_arsvd.errors import UnsupportedModelError
from onnx_arsvd.factorize import Spectrum
from onnx_arsvd.plan import LayerDecision, WeightPlan, dense_decision, plan_layers
from onnx_arsvd.settings import Settings

__all__ = ["LayerSelection", "ModelPlan", "PlanMemo", "plan_model", "select_layers"]


@dataclass
class PlanMemo:
    """What successive plans of one model share, keyed by weight: Gram matrices and spectra."""

    grams: dict[WeightKey, np.ndarray] | None = None
    spectra: dict[WeightKey, Spectrum] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelPlan:
    """Plans of the layers considered, the layers excluded by name, nodes skipped, and the graph order."""

    plans: list[WeightPlan]
    excluded: list[tuple[Layer, LayerDecision]]
    skipped: list[Skipped]
    order: dict[int, int]

    def decisions(self) -> list[LayerDecision]:
        """Every layer's decision, in graph order."""
        rows = [(layer, decision) for plan in self.plans for layer, decision in zip(plan.layers, plan.decisions)]
        rows += self.excluded
        rows.sort(key=lambda row: self.order[id(row[0].node)])
        return [decision for _, decision in rows]

    def params_kept(self) -> float:
        """Share of the considered and excluded layers' parameters the plan keeps (each weight once)."""
        decisions = [d for plan in self.plans for d in plan.decisions[:1]] + [d for _, d in self.excluded]
        return sum(d.params_after for d in decisions) / sum(d.params for d in decisions)


@dataclass(frozen=True)
class LayerSelection:
    """A model's layers sorted by what happens to them, before any weight is decomposed."""

    dense: list[Layer]
    embeddings: list[Layer]
    excluded: list[tuple[Layer, LayerDecision]]
    skipped: list[Skipped]
    order: dict[int, int]


def select_layers(model: ir.Model, settings: Settings) -> LayerSelection:
    """Find the factorable layers, drop those excluded by name (and embedding tables without a policy)."""
    layers, skipped = find_layers(model)
    if not layers:
        reasons = "; ".join(sorted({f"{s.op_type} {s.name!r}: {s.reason}" for s in skipped})[:3])
        raise UnsupportedModelError("no factorable layer (MatMul/Gemm with a 2-D float constant weight)"
                                    + (f"; skipped: {reasons}" if reasons else ""))
    considered, excluded = filter_layers(layers, settings.include, settings.exclude)
    dense = [layer for layer in considered if not layer.is_embedding]
    embeddings = [layer for layer in considered if layer.is_embedding]
    if settings.embedding_policy is None:
        excluded += [(layer, "embedding table: factored only with --embedding-tau") for layer in embeddings]
        embeddings = []
    order = {id(layer.node): index for index, layer in enumerate(layers)}
    return LayerSelection(dense, embeddings, [(layer, dense_decision(layer, reason)) for layer, reason in excluded],
                          skipped, order)


def plan_model(
    model: ir.Model, settings: Settings, *, with_factors: bool, progress: bool = False, memo: PlanMemo | None = None
) -> ModelPlan:
    """Every layer's plan under ``settings``.

    Whitened plans capture their Gram matrices unless ``memo`` has them; a ``memo`` also keeps every
    spectrum, so later plans of the same model (reloads included) decompose no weight again.
    """
    selection = select_layers(model, settings)
    dense, embeddings = selection.dense, selection.embeddings
    grams = memo.grams if memo is not None else None
    if settings.method == "whitened" and dense and grams is None:
        grams = capture_grams(model, dense, settings.calibration, progress=progress)
        if memo is not None:
            memo.grams = grams
    plan = functools.partial(plan_layers, max_rank_fraction=settings.max_rank_fraction,
                             min_params=settings.min_params, with_factors=with_factors,
                             cache=memo.spectra if memo is not None else None, progress=progress,
                             lp_power=settings.lp_power if settings.method == "lp" else None)
    plans = plan(dense, settings.policy, grams=grams if settings.method == "whitened" else None)
    if embeddings and settings.embedding_policy is not None:  # a lookup has no activations to whiten
        plans += plan(embeddings, settings.embedding_policy)
    return ModelPlan(plans, selection.excluded, selection.skipped, selection.order)
