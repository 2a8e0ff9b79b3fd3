"""Every width unit of a model: FFN hidden layers (:mod:`~onnx_arsvd.methods.width.units`) and attention heads
(:mod:`~onnx_arsvd.methods.width.heads`), and for each other product the reason it ends none."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from onnx_arsvd.graph.layers import Layer, Skipped
from onnx_arsvd.methods.width.heads import head_unit
from onnx_arsvd.methods.width.units import WidthUnit, hidden_unit

__all__ = ["describe_units", "find_width_units"]


def _unit(exit_: Layer, entries_by_node: dict[int, Layer]) -> WidthUnit | str:
    """The hidden layer or the heads behind ``exit_``; for an exit fed by a ``Reshape`` (where attention merges
    its heads) the heads' reason when neither matches, else the hidden layer's."""
    found = hidden_unit(exit_, entries_by_node)
    if not isinstance(found, str):
        return found
    hidden = exit_.node.inputs[0]
    producer = hidden.producer() if hidden is not None else None
    if producer is None or producer.op_type != "Reshape":
        return found
    return head_unit(exit_, entries_by_node)


def find_width_units(layers: Sequence[Layer]) -> tuple[list[WidthUnit], list[Skipped]]:
    """The width units among ``layers`` (dense layers of one model), and each product that ends none, with why."""
    by_node = {id(layer.node): layer for layer in layers if not layer.is_embedding}
    units: list[WidthUnit] = []
    refused: list[Skipped] = []
    for layer in by_node.values():
        found = _unit(layer, by_node)
        if isinstance(found, str):
            refused.append(Skipped(layer.name, layer.op_type, found))
        else:
            units.append(found)
    return units, refused


def describe_units(units: Sequence[WidthUnit], refused: Sequence[Skipped]) -> str:
    """One line for ``inspect``: the width units (what a budget with data may narrow) and why other products end
    none, counted by reason."""
    found = (f"{len(units)} unit(s) can be narrowed under a budget with data and `width` ("
             + ", ".join(f"{u.name}: {u.units} {u.kind}" for u in units[:3]) + (", ..." if len(units) > 3 else "")
             + ")" if units else "nothing can be narrowed")
    reasons = Counter(skipped.reason.removeprefix("not narrowed: ") for skipped in refused)
    others = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common())
    return f"note: width: {found}" + (f"; other products end no width unit: {others}" if others else "")
