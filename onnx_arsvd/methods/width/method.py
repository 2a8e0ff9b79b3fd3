"""Width reduction as a :class:`~onnx_arsvd.methods.base.Method`: each unit is a hidden layer (its entries and exit
claimed together), its settings the widths on its greedy loss curve, its plan a
:class:`~onnx_arsvd.methods.width.rewrite.WidthPlan`, its pass :class:`~onnx_arsvd.methods.width.rewrite.NarrowPass`.

A width's predicted loss is the exit's relative output error after the refit, mapped through the exit weight's
measured end-to-end response when there is one: narrowing changes the rest of the model only through the exit's
output, as factoring the exit does, so both kinds of option of one exit weight are priced on one scale.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import Layer, WeightKey, constant_tensor, find_layers
from onnx_arsvd.methods.lowrank.decision import LayerDecision
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.rewrite import NarrowPass, WidthPlan
from onnx_arsvd.methods.width.units import WidthUnit
from onnx_arsvd.numerics.allocate import DENSE, LayerOptions, hull_options
from onnx_arsvd.numerics.rank import break_even_rank
from onnx_arsvd.numerics.width import Moments, WidthCurve, group_curve, refit, width_curve

__all__ = ["UnitCurve", "Width", "exit_bias", "unit_curves"]


@dataclass(frozen=True)
class UnitCurve:
    """A width unit, its exit's input moments and its loss curve."""

    unit: WidthUnit
    moments: Moments
    curve: WidthCurve

    @property
    def key(self) -> Hashable:
        return self.unit.key

    @property
    def claims(self) -> frozenset[WeightKey]:
        return self.unit.claims


def unit_curves(units: Sequence[WidthUnit], moments: Mapping[WeightKey, Moments],
                check: Mapping[WeightKey, Moments] | None = None) -> list[UnitCurve]:
    """The loss curve of every unit whose exit the data reached; with ``check`` (moments of other data), its error
    out of sample, on that data."""
    return [UnitCurve(unit, moments[key], _curve(unit, moments[key], (check or {}).get(key)))
            for unit in units if (key := unit.exit.weight_key) in moments]


def _curve(unit: WidthUnit, moments: Moments, check: Moments | None) -> WidthCurve:
    if unit.group == 1:
        return width_curve(unit.exit.matrix(), moments, check=check)
    return group_curve(unit.exit.matrix(), moments, unit.group, check=check)


def exit_bias(unit: WidthUnit) -> np.ndarray | None:
    """The vector added to the exit's product, as a d-vector, or None."""
    exit_ = unit.exit
    if exit_.op_type == "Gemm":
        value = exit_.bias
    elif unit.exit_bias is not None:
        node, index = unit.exit_bias
        value = node.inputs[index]
    else:
        return None
    tensor = constant_tensor(value)
    if tensor is None:
        return None
    array = tensor.numpy().astype(np.float64).reshape(-1)
    return np.broadcast_to(array, (exit_.shape[1],)).copy()


def _rows(unit: WidthUnit, count: int) -> tuple[LayerDecision, ...]:
    """The report rows of the unit's layers narrowed to ``count`` of its units."""
    reason = f"narrowed: {count} of {unit.units} {unit.kind} kept"
    width = count * unit.group

    def row(layer: Layer, shape: tuple[int, int]) -> LayerDecision:
        return LayerDecision(name=layer.name, op_type=layer.op_type, weight=layer.weight_name, shape=layer.shape,
                             dtype=layer.dtype.name.lower(), break_even=break_even_rank(layer.shape),
                             full_rank=min(layer.shape), rank=min(layer.shape), energy_kept=1.0, factored=False,
                             reason=reason, shared_by=1, narrowed_to=shape)

    return (*(row(e, (e.shape[0], width)) for e in unit.entries), row(unit.exit, (width, unit.exit.shape[1])))


@dataclass(frozen=True)
class Width:
    """The method, with the grid its widths are offered on."""

    multiple: int = 8
    name: ClassVar[str] = "width"

    def options(self, units: Sequence[UnitCurve],
                statistics: Mapping[Hashable, Callable[[np.ndarray], np.ndarray]] | None) -> list[LayerOptions]:
        """Each unit's widths (hidden units on multiples of the grid, or every head count, below the full width) at
        their parameters and predicted loss (``statistics``: the units' measured responses, relative output error
        at the exit to end-to-end loss)."""
        options = []
        for c in units:
            relative = c.curve.relative()
            response = (statistics or {}).get(c.key)
            losses = response(relative) if response is not None else relative
            points = [(c.unit.params(k), float(losses[k]), k) for k in c.unit.settings(self.multiple)]
            points.append((c.unit.params(c.unit.units), 0.0, DENSE))
            options.append(hull_options(c.key, points))
        return options

    def plan(self, model: ir.Model, settings: Mapping[Hashable, int], units: Sequence[UnitCurve]) -> list[WidthPlan]:
        """The plans of the units narrowed in ``settings`` (units kept; ``DENSE`` or absent: left whole), for
        ``model`` (the original or a copy: units are matched by key)."""
        found = {unit.key: unit for unit in find_width_units(find_layers(model)[0])[0]}
        plans = []
        for c in units:
            count = settings.get(c.key, DENSE)
            if count == DENSE or c.key not in found:
                continue
            unit = found[c.key]
            kept = unit.columns(c.curve.kept(count))
            weight, bias = refit(unit.exit.matrix(), exit_bias(unit), c.moments, kept)
            plans.append(WidthPlan(c.key, kept, weight, bias, (*unit.entries, unit.exit), _rows(unit, count)))
        return plans

    def rewrite(self, plans: Sequence[WidthPlan]) -> NarrowPass:
        return NarrowPass(plans)
