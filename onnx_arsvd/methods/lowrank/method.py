"""Low rank as a :class:`~onnx_arsvd.methods.base.Method`: each unit is one weight (shared by any nodes), its
settings the ranks on its loss curve, its plan a :class:`~onnx_arsvd.methods.lowrank.plan.WeightPlan`, its pass
:class:`~onnx_arsvd.methods.lowrank.rewrite.FactorLayersPass`."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import WeightKey
from onnx_arsvd.methods.lowrank.curves import WeightCurve, allocation_plans, weight_options
from onnx_arsvd.methods.lowrank.model_plan import select_layers
from onnx_arsvd.methods.lowrank.plan import WeightPlan
from onnx_arsvd.methods.lowrank.rewrite import FactorLayersPass
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.numerics.allocate import Allocation, Cost, LayerOptions

__all__ = ["LowRank", "LowRankStatistics"]

Factors = Mapping[WeightKey, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class LowRankStatistics:
    """What low rank's options are predicted from: each weight's loss curve (its spectrum, whitened by the input
    Gram when there is data), its measured end-to-end ``responses`` and, when the search prices latency, its
    ``costs``."""

    curves: Sequence[WeightCurve]
    responses: Mapping[WeightKey, object] | None = None
    costs: Mapping[WeightKey, Cost] | None = None


@dataclass(frozen=True)
class LowRank:
    """The method with the settings that gate and grid its ranks."""

    settings: Settings
    rank_multiple: int = 8
    name: ClassVar[str] = "lowrank"

    def options(self, units: Sequence[WeightCurve], statistics: LowRankStatistics) -> list[LayerOptions]:
        """Each weight's ranks on the allocation's grid, dense included, at its cost and predicted loss."""
        return weight_options(units, responses=statistics.responses,  # type: ignore[arg-type]
                              multiple=self.rank_multiple, max_rank_fraction=self.settings.max_rank_fraction,
                              min_params=self.settings.min_params, costs=statistics.costs)

    def plan(self, model: ir.Model, settings: Mapping[Hashable, int], units: Sequence[WeightCurve],
             factors: Factors | None = None) -> list[WeightPlan]:
        """The plans of ``model``'s layers at these ranks (factors cut from each curve, or ``factors``)."""
        layers = select_layers(model, self.settings).dense
        allocation = Allocation(dict(settings), 0.0, 0.0)
        return allocation_plans(layers, units, allocation, min_params=self.settings.min_params, factors=factors)

    def rewrite(self, plans: Sequence[WeightPlan]) -> FactorLayersPass:
        return FactorLayersPass(plans)
