"""The graph pass: each factored layer becomes MatMul(X, A) -> MatMul(., B) [-> Add(bias)].

Alpha is folded into A, beta into the bias; factors are stored in the weight's own dtype. The
rewritten output keeps the original value's name, type and shape, so graph outputs are unchanged.
Initializers and ``Constant`` nodes that nothing uses any more are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnx_arsvd.candidates import Layer, constant_tensor, node_label
from onnx_arsvd.plan import WeightPlan

__all__ = ["apply_plans"]


class _Namer:
    """Hands out value and node names not yet used in the graph."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken: set[str] = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
        for node in graph.all_nodes():
            self._taken.add(node.name or "")
            self._taken.update(v.name for v in node.outputs if v.name)

    def __call__(self, base: str) -> str:
        name, suffix = base, 1
        while name in self._taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        self._taken.add(name)
        return name


class _Rewriter:
    """Adds factor initializers and replaces nodes in one graph."""

    def __init__(self, model: ir.Model) -> None:
        self.graph = model.graph
        self.name = _Namer(model.graph)
        self.initializers_are_inputs = model.ir_version < 4  # IR 3 requires it of every initializer

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = self.name(base)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.type, value.shape = ir.TensorType(value.const_value.dtype), ir.Shape(array.shape)
        self.graph.register_initializer(value)
        if self.initializers_are_inputs:
            self.graph.inputs.append(value)
        return value

    def bias(self, layer: Layer, dtype: np.dtype, out_features: int) -> ir.Value | None:
        """beta * C as an (n,) vector in the weight's dtype; C itself when it already is one."""
        if layer.bias is None:
            return None
        tensor = constant_tensor(layer.bias)
        if layer.beta == 1.0 and tuple(tensor.shape) == (out_features,) and tensor.dtype == layer.dtype:
            return layer.bias
        bias = layer.beta * np.broadcast_to(tensor.numpy().astype(np.float64).reshape(-1), (out_features,))
        return self.initializer(f"{node_label(layer.node)}.arsvd_bias", bias.astype(dtype))

    def replace(self, layer: Layer, a: ir.Value, b: ir.Value, bias: ir.Value | None, rank: int) -> None:
        """Swap the layer's node for MatMul(X, A) (or Gather(A, ids)) -> MatMul(., B) [-> Add(bias)], keeping its output."""
        node, label = layer.node, node_label(layer.node)
        old_output = node.outputs[0]
        tensor_type = ir.TensorType(layer.dtype)
        low = ir.Value(name=self.name(f"{label}/arsvd_low_rank"), type=tensor_type)
        if layer.is_embedding:  # Gather(W, ids) -> Gather(A, ids) @ B
            ids = node.inputs[1]
            low.shape = ir.Shape([*ids.shape, rank]) if ids.shape is not None else None
            first = ir.Node("", "Gather", [a, ids], [ir.AttrInt64("axis", 0)], outputs=[low], name=self.name(f"{label}/arsvd_a"))
        else:
            x = node.inputs[0]
            low.shape = ir.Shape([*x.shape[:-1], rank]) if x.shape is not None and len(x.shape) > 0 else None
            first = ir.Node("", "MatMul", [x, a], outputs=[low], name=self.name(f"{label}/arsvd_a"))
        new_nodes = [first]
        result = ir.Value(name=self.name(f"{label}/arsvd_product"), type=tensor_type, shape=old_output.shape)
        new_nodes.append(ir.Node("", "MatMul", [low, b], outputs=[result], name=self.name(f"{label}/arsvd_b")))
        if bias is not None:
            product = result
            result = ir.Value(name=self.name(f"{label}/arsvd_biased"), type=tensor_type, shape=old_output.shape)
            new_nodes.append(ir.Node("", "Add", [product, bias], outputs=[result], name=self.name(f"{label}/arsvd_bias")))
        self.graph.insert_before(node, new_nodes)
        name, output_type, output_shape = old_output.name, old_output.type, old_output.shape
        old_output.replace_all_uses_with(result, replace_graph_outputs=True)
        self.graph.remove(node, safe=True)
        result.name, result.type, result.shape = name, output_type or tensor_type, output_shape


def _drop_orphans(graph: ir.Graph, values: Iterable[ir.Value | None]) -> None:
    """Remove initializers and Constant nodes that the rewrite left without a use."""
    for value in {id(v): v for v in values if v is not None}.values():
        if value.uses() or value.is_graph_output():
            continue
        if value.is_initializer() and value.name in graph.initializers:
            del graph.initializers[value.name]
            if value in graph.inputs:  # IR < 4 lists initializers among the inputs
                graph.inputs.remove(value)
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and not any(o.uses() for o in producer.outputs):
            graph.remove(producer, safe=True)


def apply_plans(model: ir.Model, plans: Sequence[WeightPlan]) -> int:
    """Rewrite, in place, every node of every factored plan; returns how many nodes were rewritten."""
    rewriter = _Rewriter(model)
    touched: list[ir.Value | None] = []
    rewritten = 0
    for plan in plans:
        if not plan.factored or plan.factors is None:
            continue
        a_factor, b_factor = plan.factors
        first = plan.layers[0]
        dtype = first.dtype.numpy()
        base = first.weight_name or node_label(first.node)
        b = rewriter.initializer(f"{base}.arsvd_b", b_factor.astype(dtype, copy=False))  # no copy when already dtype
        a_by_alpha: dict[float, ir.Value] = {}
        for layer in plan.layers:
            if layer.alpha not in a_by_alpha:
                scaled = a_factor if layer.alpha == 1 else layer.alpha * a_factor
                a_by_alpha[layer.alpha] = rewriter.initializer(f"{base}.arsvd_a", scaled.astype(dtype, copy=False))
            rewriter.replace(layer, a_by_alpha[layer.alpha], b, rewriter.bias(layer, dtype, first.shape[1]), plan.rank)
            touched += [layer.weight, layer.bias]
            rewritten += 1
    _drop_orphans(model.graph, touched)
    return rewritten
