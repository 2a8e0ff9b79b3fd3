"""The graph pass that narrows width units: every weight and per-unit constant sliced to the kept units, the exit's
weight and bias replaced by their refit, every static shape that names the width changed; no node is added but the
exit's bias ``Add`` where a ``MatMul`` exit had none. Graph inputs and outputs are unchanged."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import Layer, constant_tensor, find_layers
from onnx_arsvd.graph.naming import Namer
from onnx_arsvd.methods.lowrank.decision import LayerDecision
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.units import WidthUnit

__all__ = ["NarrowPass", "WidthPlan"]


@dataclass(frozen=True)
class WidthPlan:
    """A width unit at its kept units: the exit's refitted weight (kept x d) and bias (d), and the report rows."""

    key: Hashable
    kept: np.ndarray
    exit_weight: np.ndarray
    exit_bias: np.ndarray
    layers: tuple[Layer, ...]
    decisions: tuple[LayerDecision, ...]

    @property
    def changed(self) -> bool:
        return True

    @property
    def rows(self) -> tuple[LayerDecision, ...]:
        return self.decisions


class _Narrower:
    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.names = Namer(model.graph)
        self.inputs_too = model.ir_version < 4  # IR 3 lists every initializer among the graph's inputs

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.names(base)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name), type=ir.TensorType(
            ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape))
        self.graph.register_initializer(value)
        if self.inputs_too:
            self.graph.inputs.append(value)
        return value

    def replace(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        """Input ``index`` of ``node`` becomes a new constant holding ``array``; the old one goes when unused."""
        old = node.inputs[index]
        assert old is not None
        node.replace_input_with(index, self.constant(f"{old.name or 'constant'}/narrowed", array))
        self.drop_if_unused(old)

    def drop_if_unused(self, value: ir.Value) -> None:
        if value.uses() or value.is_graph_output():
            return
        producer = value.producer()
        if value.name is not None and self.graph.initializers.get(value.name) is value:
            del self.graph.initializers[value.name]
            if value in self.graph.inputs:
                self.graph.inputs.remove(value)
        elif producer is not None and producer.op_type == "Constant":
            self.graph.remove(producer, safe=True)

    def narrow(self, unit: WidthUnit, plan: WidthPlan) -> None:
        kept, width = plan.kept, unit.width
        for entry in unit.entries:
            stored = _stored(entry)
            self.replace(entry.node, 1, np.take(stored, kept, axis=0 if entry.transposed else 1))
            if entry.bias is not None:
                bias = _stored_value(entry.bias)
                if bias.size == width:
                    self.replace(entry.node, 2, bias.reshape(-1)[kept].reshape(*bias.shape[:-1], len(kept)))
        for node, index in unit.per_unit:
            value = node.inputs[index]
            assert value is not None
            array = _stored_value(value)
            self.replace(node, index, np.take(array, kept, axis=-1))
        exit_ = unit.exit
        dtype = _stored(exit_).dtype
        weight = plan.exit_weight.astype(dtype)
        self.replace(exit_.node, 1, weight.T if exit_.transposed else weight)
        bias = plan.exit_bias.astype(dtype)
        if exit_.op_type == "Gemm":
            if exit_.bias is not None:
                self.replace(exit_.node, 2, bias)
            else:
                exit_.node.replace_input_with(2, self.constant(f"{exit_.weight_name}/narrowed_bias", bias))
        elif unit.exit_bias is not None:
            self.replace(*unit.exit_bias, bias)
        else:
            self.add_bias(exit_, bias)
        for node, index, position in unit.shape_constants:
            value = node.inputs[index]
            assert value is not None
            target = _stored_value(value).copy()
            target.reshape(-1)[position] = target.reshape(-1)[position] * len(kept) // width
            self.replace(node, index, target)
        for node in [*(e.node for e in unit.entries), *unit.region]:
            for output in node.outputs:
                if output.shape is not None and len(output.shape) and output.shape[-1] == width:
                    output.shape = ir.Shape([*output.shape[:-1], len(kept)])
                elif unit.group > 1 and node in unit.region:
                    output.shape = None  # a head axis somewhere: let shape inference find it again

    def add_bias(self, exit_: Layer, bias: np.ndarray) -> None:
        """An ``Add`` of ``bias`` after a MatMul exit that had none; its output takes over the product's uses."""
        product = exit_.node.outputs[0]
        summed = ir.Value(name=self.names(f"{product.name}/narrowed"), type=product.type, shape=product.shape)
        product.replace_all_uses_with(summed, replace_graph_outputs=True)
        if summed.is_graph_output():  # the graph output keeps its name
            summed.name, product.name = product.name, summed.name
        add = ir.Node("", "Add", [product, self.constant(f"{exit_.weight_name}/narrowed_bias", bias)],
                      outputs=[summed], name=self.names(f"{exit_.node.name or 'exit'}/narrowed_bias"))
        self.graph.insert_after(exit_.node, add)


def _stored(layer: Layer) -> np.ndarray:
    return _stored_value(layer.weight)


def _stored_value(value: ir.Value) -> np.ndarray:
    tensor = constant_tensor(value)
    assert tensor is not None
    return tensor.numpy()


class NarrowPass(ir.passes.InPlacePass):
    """Narrow the width units of ``plans`` (matched by key in the model the pass is called on)."""

    def __init__(self, plans: Sequence[WidthPlan]) -> None:
        super().__init__()
        self.plans = plans

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.plans:
            return ir.passes.PassResult(model, modified=False)
        units = {unit.key: unit for unit in find_width_units(find_layers(model)[0])[0]}
        narrower = _Narrower(model)
        for plan in self.plans:
            narrower.narrow(units[plan.key], plan)
        return ir.passes.PassResult(model, modified=True)
