"""A model's layers as loss curves and allocation options, and an allocation back as weight plans.

The bridge between the graph (layers, Gram matrices, :class:`~onnx_arsvd.methods.lowrank.plan.WeightPlan`) and the
pure numerics (:mod:`onnx_arsvd.numerics.losscurve`, :mod:`onnx_arsvd.numerics.allocate`): every weight is decomposed
once here, and any number of allocations then become plans by slicing its curve's factors.
Without a Gram matrix (plain SVD) the curve is that of identity inputs, ||W - A B||_F^2.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np

from onnx_arsvd.errors import UnsupportedModelError
from onnx_arsvd.graph.layers import Layer, WeightKey
from onnx_arsvd.measure.calibration import Gram
from onnx_arsvd.methods.lowrank.decision import DEFAULT_MAX_RANK_FRACTION, DEFAULT_MIN_PARAMS, LayerDecision
from onnx_arsvd.methods.lowrank.plan import WeightPlan, group_by_weight
from onnx_arsvd.numerics.allocate import DENSE, Allocation, Cost, LayerOptions, layer_options, param_cost
from onnx_arsvd.numerics.losscurve import LossCurve, loss_curve
from onnx_arsvd.numerics.rank import break_even_rank
from onnx_arsvd.numerics.threads import in_jobs
from onnx_arsvd.progress import progress_bar

__all__ = ["WeightCurve", "allocation_plans", "weight_curves", "weight_options"]


@dataclass(frozen=True)
class WeightCurve:
    """One weight, the nodes that use it, and its loss curve."""

    layers: list[Layer]
    curve: LossCurve

    @property
    def key(self) -> WeightKey:
        return self.layers[0].weight_key

    @property
    def claims(self) -> frozenset[WeightKey]:
        """The weights this unit changes: its own."""
        return frozenset({self.key})


def _matrix(layer: Layer) -> np.ndarray:
    array = layer.matrix()
    if not np.isfinite(array).all():
        raise UnsupportedModelError(f"weight {layer.weight_name!r} of node {layer.name!r} contains NaN or Inf")
    return array


def weight_curves(layers: Sequence[Layer], grams: MutableMapping[WeightKey, Gram] | None = None, *,
                  progress: bool = False, jobs: int = 1, release: bool = False,
                  max_rank_fraction: float | None = None, probes: Sequence[float] = ()) -> list[WeightCurve]:
    """One loss curve per distinct weight (shared weights once, their Grams summed by calibration), in layer order.

    ``jobs`` weights at once, each on one BLAS thread, as factoring does (see :mod:`onnx_arsvd.numerics.threads`).
    With ``release`` each Gram is removed from ``grams`` once its curve is made, so the Grams (float64,
    m x m per weight) and the curves are not all held at once. With ``max_rank_fraction`` each curve
    stores the factors a search may ask of it only: the ranks up to that fraction of break-even (the
    most an allocation offers, :func:`onnx_arsvd.numerics.allocate.option_ranks`; 0.8 of break-even is at most
    0.4 min(m, n)), and the ranks nearest the relative errors in ``probes`` (the layer responses'),
    so the curves of a search hold about half of what full ones would.
    """

    def curve(group: list[Layer]) -> WeightCurve:
        matrix = _matrix(group[0])
        key = group[0].weight_key
        gram = grams.get(key) if grams is not None else None
        made = loss_curve(matrix, gram if gram is not None else np.eye(matrix.shape[0]))
        if max_rank_fraction is not None:
            limit = int(max_rank_fraction * break_even_rank(group[0].shape))
            made = made.truncated(max([1, limit, *(made.rank_nearest(probe) for probe in probes)]))
        if release and grams is not None:
            grams.pop(key, None)
        return WeightCurve(group, made)

    groups = group_by_weight(layers)
    with progress_bar(total=len(groups), desc="loss curves", unit="weight", progress=progress) as bar:
        return in_jobs(curve, groups, jobs, lambda _: bar.update())


def weight_options(
    curves: Sequence[WeightCurve],
    *,
    responses: Mapping[WeightKey, Callable[[np.ndarray], np.ndarray]] | None = None,
    multiple: int = 8,
    max_rank_fraction: float = DEFAULT_MAX_RANK_FRACTION,
    min_params: int = DEFAULT_MIN_PARAMS,
    costs: Mapping[WeightKey, Cost] | None = None,
) -> list[LayerOptions]:
    """Allocation options of every weight; losses are relative output errors (loss / output energy),
    mapped through the weight's measured end-to-end response when ``responses`` has one; each weight
    costs its parameters unless ``costs`` has its cost function (e.g. measured latency)."""
    return [layer_options(c.key, c.curve.shape, (responses or {}).get(c.key, _same)(c.curve.relative()),
                          multiple=multiple, max_rank_fraction=max_rank_fraction, min_params=min_params,
                          cost=(costs or {}).get(c.key, param_cost))
            for c in curves]


def _same(relative: np.ndarray) -> np.ndarray:
    return relative


def allocation_plans(layers: Sequence[Layer], curves: Sequence[WeightCurve], allocation: Allocation, *,
                     min_params: int = DEFAULT_MIN_PARAMS, with_factors: bool = True,
                     factors: Mapping[WeightKey, tuple[np.ndarray, np.ndarray]] | None = None) -> list[WeightPlan]:
    """The weight plans of an allocation for ``layers`` (of the model to rewrite, which may be a fresh
    copy of the one the curves came from: weights are matched by key), factors sliced from each curve
    unless ``factors`` has the weight's (e.g. refitted by :mod:`onnx_arsvd.methods.lowrank.sequential`)."""
    by_key: dict[WeightKey, list[Layer]] = {}
    for layer in layers:
        by_key.setdefault(layer.weight_key, []).append(layer)
    plans = []
    for c in curves:
        group = by_key.get(c.key)
        if not group:
            continue
        rank = allocation.ranks.get(c.key, DENSE)
        shape = c.curve.shape
        factored = rank != DENSE
        if factored:
            reason = ""
        elif shape[0] * shape[1] < min_params:
            reason = f"too small to pay off (< {min_params} parameters)"
        else:
            reason = "dense in the global allocation (its loss per parameter saved is too high)"
        shown = rank if factored else min(shape)
        decisions = [
            LayerDecision(
                name=layer.name, op_type=layer.op_type, weight=layer.weight_name, shape=shape,
                dtype=layer.dtype.name.lower(), break_even=break_even_rank(shape), full_rank=min(shape), rank=shown,
                energy_kept=float(1.0 - c.curve.relative()[shown]), factored=factored, reason=reason,
                shared_by=len(group),
            )
            for layer in group
        ]
        chosen = None
        if factored and with_factors:
            chosen = factors[c.key] if factors is not None and c.key in factors else c.curve.factors(rank)
        plans.append(WeightPlan(layers=tuple(group), rank=shown, decisions=tuple(decisions), factors=chosen))
    return plans
