"""The seam a compression method plugs into: what the global search asks of it, and nothing more.

A method offers for each of its *units* a few settings with their cost and the loss it predicts from activation
statistics (:class:`~onnx_arsvd.numerics.allocate.LayerOptions`, its dense setting included), plans the settings
the knapsack picked as frozen values that know their report rows, and supplies the ``onnx_ir`` pass that applies
them. A unit *claims* the weights it changes: the search groups every method's options where claims overlap, so
such units are alternatives of one choice in the knapsack (:mod:`onnx_arsvd.numerics.choices`).
``docs/methods.md`` walks through the low-rank method (:class:`onnx_arsvd.methods.lowrank.method.LowRank`) and
width reduction (:class:`onnx_arsvd.methods.width.method.Width`).

Finding the units and gathering their statistics is still each method's own code (low rank:
:func:`~onnx_arsvd.methods.lowrank.model_plan.select_layers`, :func:`~onnx_arsvd.methods.lowrank.curves.weight_curves`;
width: :func:`~onnx_arsvd.methods.width.find.find_width_units`, :func:`~onnx_arsvd.methods.width.method.unit_curves`;
the nodes passed over are the :class:`Refusal` rows).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Protocol

import onnx_ir as ir

from onnx_arsvd.graph.layers import Skipped
from onnx_arsvd.methods.lowrank.decision import LayerDecision
from onnx_arsvd.numerics.allocate import LayerOptions

__all__ = ["Method", "Refusal", "Unit", "UnitPlan"]

Refusal = Skipped
"""A node a method passes over, by name and op type, with the reason (``inspect`` lists them)."""


class Unit(Protocol):
    """What a method changes as one: its ``key`` (unique in the model) and the weights it ``claims``."""

    @property
    def key(self) -> Hashable: ...

    @property
    def claims(self) -> frozenset[Hashable]: ...


class UnitPlan(Protocol):
    """A unit at its chosen setting, as a frozen value: whether it changes the model, and its report rows."""

    @property
    def changed(self) -> bool: ...

    @property
    def rows(self) -> Sequence[LayerDecision]: ...


class Method(Protocol):
    """A compression method, as the global search uses it."""

    name: str

    def options(self, units: Sequence[Any], statistics: Any) -> list[LayerOptions]:
        """Each unit's settings (dense included) with their costs and predicted losses, from ``statistics`` (the
        activation statistics the method gathered: input Gram matrices, measured responses, latency prices)."""
        ...

    def plan(self, model: ir.Model, settings: Mapping[Hashable, Any], units: Sequence[Any]) -> Sequence[UnitPlan]:
        """The plans of ``model`` (the original or a fresh copy: units are matched by key) at these settings."""
        ...

    def rewrite(self, plans: Sequence[Any]) -> ir.passes.InPlacePass:
        """The pass that applies ``plans`` to the model they were made for."""
        ...
