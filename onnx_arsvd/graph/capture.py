"""Expose each layer's input activation as a main-graph output, also from inside If/Loop/Scan bodies.

onnxruntime returns only a model's graph outputs, so a value computed in a body is lifted scope by
scope: it becomes an extra output of its body and of the node that owns the body. For a ``Loop`` or
``Scan`` body the extra output is a scan output (one slice per iteration, stacked); for an ``If``
branch the other branch outputs rows of zeros (they add nothing to a Gram matrix): zeros shaped like
the value when that branch can see it, else an empty tensor of the same dtype and rank. Whichever
branch runs, the If's extra output holds exactly the rows the layer saw.
The model is a clone; the original is not touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import Layer, find_layers

__all__ = ["exposed_model"]


def _bodies(graph: ir.Graph) -> Iterator[tuple[ir.Graph, ir.Node]]:
    """(body, owning node) for every body at any depth."""
    for node in graph:
        for attr in node.attributes.values():
            for body in [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                    list(attr.value) if attr.type == ir.AttributeType.GRAPHS else []):
                yield body, node
                yield from _bodies(body)


def _empty_like(value: ir.Value, features: int, feature_axis: int) -> np.ndarray:
    """An array of value's dtype and rank with no rows: every axis 0 except ``features`` on ``feature_axis``."""
    rank = len(value.shape) if value.shape is not None else 2
    dims = [0] * rank
    dims[feature_axis] = features
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    return np.zeros(dims, dtype)


class _Lifter:
    def __init__(self, model: ir.Model) -> None:
        self.main = model.graph
        self.owners = {id(body): owner for body, owner in _bodies(model.graph)}
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}/arsvd_capture_{self.count}"

    def _output(self, body: ir.Graph, value: ir.Value) -> None:
        """value, through an Identity, as a new output of ``body``."""
        out = ir.Value(name=self.name(value.name or "value"), type=value.type, shape=value.shape)
        body.append(ir.Node("", "Identity", [value], outputs=[out]))
        body.outputs.append(out)

    def _nothing(self, branch: ir.Graph, value: ir.Value, visible: bool, features: int, feature_axis: int) -> None:
        """An output of ``branch`` that adds no rows: zeros shaped like ``value`` when the branch can see it
        (so a loop stacking it gets one shape every iteration), else an empty tensor of its rank."""
        out = ir.Value(name=self.name(value.name or "nothing"), type=value.type)
        if visible:
            shape = ir.Value(name=self.name(f"{value.name}/shape"))
            zero = ir.tensor(np.zeros(1, _empty_like(value, features, feature_axis).dtype))
            branch.append(ir.Node("", "Shape", [value], outputs=[shape]))
            branch.append(ir.Node("", "ConstantOfShape", [shape], [ir.AttrTensor("value", zero)], outputs=[out]))
        else:
            empty = ir.tensor(_empty_like(value, features, feature_axis))
            branch.append(ir.Node("", "Constant", [], [ir.AttrTensor("value", empty)], outputs=[out]))
        branch.outputs.append(out)

    def lift(self, value: ir.Value, graph: ir.Graph | None, features: int, feature_axis: int) -> ir.Value:
        """The main-graph value that carries the rows ``value`` has when ``graph`` (a body that uses it) runs.

        Lifted from the layer's own body even when the value comes from an outer scope: an If branch
        then counts only the rows it ran on, a Loop body each iteration's.
        """
        while graph is not None and graph is not self.main:
            owner = self.owners[id(graph)]
            self._output(graph, value)
            if owner.op_type == "If":
                for attr in owner.attributes.values():
                    if attr.type == ir.AttributeType.GRAPH and attr.value is not graph:
                        self._nothing(attr.value, value, value.graph is not graph, features, feature_axis)
            elif owner.op_type == "Scan":
                for name in ("scan_output_axes", "scan_output_directions"):
                    if (axes := owner.attributes.get(name)) is not None:
                        owner.attributes[name] = ir.AttrInt64s(name, [*axes.value, 0])
            owner.resize_outputs(len(owner.outputs) + 1)
            value = owner.outputs[-1]
            value.name, value.type = self.name(owner.name or owner.op_type), graph.outputs[-1].type
            graph = owner.graph
        return value


def _key(layer: Layer) -> tuple[str, str, str]:
    """Identifies a layer's node across clones: its scope, name and first output's name (unique in its scope)."""
    return layer.scope, layer.node.name or "", layer.node.outputs[0].name or ""


def exposed_model(model: ir.Model, layers: Sequence[Layer]) -> tuple[ir.Model, dict[int, str]]:
    """A clone of the model (sharing its weights) with every layer's input as a graph output; and, by
    ``id(layer.node)``, the name of that output."""
    clone = model.clone()
    twins = {_key(layer): layer for layer in find_layers(clone)[0]}
    lifter = _Lifter(clone)
    present = {id(v) for v in clone.graph.outputs}
    names: dict[int, str] = {}
    lifted: dict[tuple[int, int, int], ir.Value] = {}
    for layer in layers:
        twin = twins[_key(layer)]
        value = twin.node.inputs[1 if twin.left else 0]
        assert value is not None  # a layer's activation input is never absent
        axis = -2 if twin.left != twin.trans_x else -1
        key = (id(value), id(twin.node.graph), axis)
        if key not in lifted:
            lifted[key] = lifter.lift(value, twin.node.graph, twin.shape[0], axis)
            if id(lifted[key]) not in present:
                clone.graph.outputs.append(lifted[key])
                present.add(id(lifted[key]))
        names[id(layer.node)] = lifted[key].name or ""
    return clone, names
