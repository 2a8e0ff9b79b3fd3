"""Width units in a graph: hidden layers whose units can be removed, each with the products into and out of it.

A unit is ``entry products -> elementwise region -> exit product``: one or more ``MatMul``/``Gemm`` layers with a
constant weight (an FFN's up-projection; SwiGLU/GeGLU's gate and up) compute the h hidden units, a region of
elementwise ops combines them unit by unit (a bias ``Add``, any activation spelling exporters write: Relu, the Erf
diamond of GELU, its tanh approximation, ``Gelu``/``FastGelu``/``BiasGelu``, SiLU as ``Sigmoid``-``Mul``, a gate's
``Mul``), and one exit layer multiplies the result by its h x d weight. Removing unit j then removes column j of
every entry, entry j of every per-unit constant in the region and row j of the exit, and changes nothing else,
provided no value in between is used outside the unit. Every candidate exit that fails a condition is a refusal
with its reason (``inspect`` lists them).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import Layer, WeightKey, constant_tensor

__all__ = ["WidthUnit", "bias_add", "hidden_unit", "leaks", "per_unit_kind", "plain_reason"]

_ELEMENTWISE = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal", "Erf", "Tanh",
    "Sigmoid", "HardSigmoid", "HardSwish", "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Mish", "Clip",
    "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Cast", "Identity",
})
"""Ops that act on each hidden unit alone (with scalar or per-unit constants)."""
_DOMAINS = frozenset({"", "ai.onnx", "com.microsoft"})


@dataclass(frozen=True, eq=False)
class WidthUnit:
    """One hidden layer: its ``entries`` (products into it), ``region`` (the nodes between them and the exit),
    ``exit`` (the product out of it), the region's per-unit constant inputs as (node, input index), and the exit's
    bias ``Add`` (a node adding a constant d-vector to the exit's output, the exit's only use) when it has one.

    A unit removed is ``group`` adjacent columns of the entries and rows of the exit: 1 for an FFN's hidden unit,
    the head size for an attention head (:mod:`onnx_arsvd.methods.width.heads`). ``shape_constants`` are the shape
    entries that name the width, as (node, input index, position): a head count or the merged width, each scaled
    by the share of units kept (a ``-1`` there needs no entry)."""

    entries: tuple[Layer, ...]
    exit: Layer
    region: tuple[ir.Node, ...]
    per_unit: tuple[tuple[ir.Node, int], ...]
    exit_bias: tuple[ir.Node, int] | None
    group: int = 1
    shape_constants: tuple[tuple[ir.Node, int, int], ...] = ()

    @property
    def key(self) -> Hashable:
        return ("width", self.exit.weight_key)

    @property
    def claims(self) -> frozenset[WeightKey]:
        """The weights narrowing changes: every entry's and the exit's."""
        return frozenset({*(entry.weight_key for entry in self.entries), self.exit.weight_key})

    @property
    def width(self) -> int:
        """The hidden width in columns (the exit's input features)."""
        return self.exit.shape[0]

    @property
    def units(self) -> int:
        """How many units can be removed: hidden units, or heads."""
        return self.width // self.group

    @property
    def kind(self) -> str:
        return "hidden units" if self.group == 1 else "heads"

    @property
    def name(self) -> str:
        return self.exit.name

    def settings(self, multiple: int) -> range:
        """The unit counts offered below the full one: multiples of ``multiple`` hidden units, or every head count."""
        step = multiple if self.group == 1 else 1
        return range(step, self.units, step)

    def columns(self, kept: np.ndarray) -> np.ndarray:
        """The hidden columns of the ``kept`` units, ascending."""
        kept = np.sort(np.asarray(kept, dtype=np.int64))
        return (kept[:, None] * self.group + np.arange(self.group)[None, :]).reshape(-1)

    def params(self, count: int) -> float:
        """The weights' parameters with ``count`` units kept (biases aside, as low rank counts them)."""
        return float(count * self.group * (sum(entry.shape[0] for entry in self.entries) + self.exit.shape[1]))


def _is_constant(value: ir.Value) -> bool:
    return constant_tensor(value) is not None


def per_unit_kind(value: ir.Value, width: int) -> bool | None:
    """Whether a constant holds one entry per unit (True), one for all (False), or neither (None)."""
    tensor = constant_tensor(value)
    assert tensor is not None
    dims = tensor.shape.numpy()
    if int(np.prod(dims)) == 1:
        return False
    if dims and dims[-1] == width and int(np.prod(dims)) == width:
        return True
    return None


def plain_reason(layer: Layer) -> str:
    """Why a layer cannot take part in a width unit, or ""."""
    if layer.in_subgraph or layer.weight_scope:
        return "inside a subgraph"
    if layer.left or layer.trans_x or layer.chain or layer.is_embedding:
        return "not a plain product X @ W of a stored weight"
    if layer.alpha != 1.0 or (layer.bias is not None and layer.beta != 1.0):
        return "Gemm with alpha or beta other than 1"
    if len(layer.weight.uses()) != 1:
        return "its weight is shared by other nodes"
    return ""


def bias_add(exit_: Layer) -> tuple[ir.Node, int] | None:
    """The ``Add`` of a constant d-vector that is the exit's output's only use (a MatMul's bias), if any."""
    if exit_.op_type != "MatMul":
        return None
    output = exit_.node.outputs[0]
    uses = list(output.uses())
    if len(uses) != 1 or output.is_graph_output():
        return None
    node = uses[0][0]
    if node.op_type != "Add" or node.domain not in _DOMAINS or len(node.inputs) != 2:
        return None
    other = 1 - uses[0][1]
    value = node.inputs[other]
    tensor = constant_tensor(value) if value is not None else None
    if tensor is None or tuple(tensor.shape.numpy()) != (exit_.shape[1],):
        return None
    return node, other


def leaks(entries: Iterable[Layer], region: Iterable[ir.Node], exit_: Layer) -> bool:
    """Whether a value the entries or the region compute is a graph output or used by a node outside the region
    and the exit: removing units would then change what that node sees."""
    region = list(region)
    inside = {*map(id, region), id(exit_.node)}
    return any(output.is_graph_output() or any(id(user) not in inside for user, _ in output.uses())
               for node in [*(e.node for e in entries), *region] for output in node.outputs)


def hidden_unit(exit_: Layer, entries_by_node: dict[int, Layer]) -> WidthUnit | str:
    """The unit behind ``exit_``, or why there is none."""
    if reason := plain_reason(exit_):
        return f"not narrowed: {reason}"
    width = exit_.shape[0]
    hidden = exit_.node.inputs[0]
    assert hidden is not None
    entries: dict[int, Layer] = {}
    region: dict[int, ir.Node] = {}
    per_unit: list[tuple[ir.Node, int]] = []
    pending = [hidden]
    while pending:
        value = pending.pop()
        producer = value.producer()
        if producer is None:
            return "not narrowed: its input is not computed from a product in the graph"
        if id(producer) in entries or id(producer) in region:
            continue
        if id(producer) in entries_by_node:
            entry = entries_by_node[id(producer)]
            if reason := plain_reason(entry):
                return f"not narrowed: entry {entry.name!r} is {reason}"
            if entry.shape[1] != width:
                return f"not narrowed: entry {entry.name!r} has {entry.shape[1]} outputs, the exit {width} inputs"
            entries[id(producer)] = entry
            continue
        if producer.op_type not in _ELEMENTWISE or producer.domain not in _DOMAINS:
            return f"not narrowed: {producer.op_type} between the hidden units and this product"
        region[id(producer)] = producer
        for index, operand in enumerate(producer.inputs):
            if operand is None:
                continue
            if _is_constant(operand):
                kind = per_unit_kind(operand, width)
                if kind is None:
                    return f"not narrowed: {producer.op_type} takes a constant that is neither scalar nor per unit"
                if kind:
                    per_unit.append((producer, index))
            else:
                pending.append(operand)
    if not entries:
        return "not narrowed: no product computes its hidden units"
    if leaks(entries.values(), region.values(), exit_):
        return "not narrowed: a hidden value is used outside the layer"
    for entry in entries.values():
        if entry.bias is not None and per_unit_kind(entry.bias, width) is None:
            return f"not narrowed: entry {entry.name!r} has a bias that is neither scalar nor per unit"
    ordered = tuple(sorted(entries.values(), key=lambda e: e.name))
    return WidthUnit(ordered, exit_, tuple(region.values()), tuple(per_unit), bias_add(exit_))
