"""The graph pass: each factored layer becomes two thin products (and its bias), in whatever graph it is.

``X @ M`` becomes ``MatMul(X, A) -> MatMul(., B) [-> Add(bias)]`` (``Gather(A, ids)`` first for an
embedding, ``Gemm(X, A, transA=1)`` first for Gemm's transA); a constant first operand ``W @ X``
becomes ``MatMul(A, X) -> MatMul(B, .)`` (Gemm: ``Gemm(A, X) -> Gemm(B, ., C)``, which keeps C and beta).
Alpha and beta are folded as :mod:`onnx_arsvd.methods.lowrank.layer_math` says. Factors are stored in the dtype the
layer computes in, or, for a weight stored narrow and widened by a ``Cast`` (fp16 storage, fp32
compute), in its own dtype followed by a ``Cast``. A layer inside an If/Loop/Scan body is rewritten in
that body; its factors are initializers of the scope where its weight is defined, so every node that
shared the weight (in any body) uses the same factors. The rewritten output keeps the original value's
name, type and shape, so graph and body outputs are unchanged. Initializers, ``Constant`` nodes and
Transpose/Cast/Reshape/Identity chains that nothing uses any more are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import Layer, constant_tensor, node_label
from onnx_arsvd.graph.naming import Namer
from onnx_arsvd.methods.lowrank.layer_math import folded_bias, stored_factors
from onnx_arsvd.methods.lowrank.plan import WeightPlan

if TYPE_CHECKING:
    from onnx_arsvd.io.spill import Spill

__all__ = ["FactorLayersPass", "apply_plans"]

_DROPPABLE_PRODUCERS = frozenset({"Constant", "Transpose", "Cast", "Reshape", "Identity"})


def _graph_of(node: ir.Node) -> ir.Graph:
    """The graph a node belongs to (every node of a loaded model has one)."""
    if node.graph is None:
        raise ValueError(f"node {node_label(node)!r} belongs to no graph")
    return node.graph


def _shape(dims: list[Any] | None) -> ir.Shape | None:
    return ir.Shape(dims) if dims is not None else None


class _Rewriter:
    """Adds factor initializers and replaces nodes, in any graph of one model."""

    def __init__(self, model: ir.Model, spill: Spill | None = None) -> None:
        self.main = model.graph
        self.name = Namer(model.graph)
        self.initializers_are_inputs = model.ir_version < 4  # IR 3 requires it of every main-graph initializer
        self.spill = spill

    def initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        """A constant in ``graph``: an initializer, or in an IR 3 body (which may hold none) a ``Constant`` node."""
        name = self.name(base)
        tensor = self.spill.tensor(array, name) if self.spill is not None else ir.tensor(array, name=name)
        value = ir.Value(name=name, const_value=tensor, type=ir.TensorType(tensor.dtype), shape=ir.Shape(array.shape))
        if self.initializers_are_inputs and graph is not self.main:
            value.const_value = None
            constant = ir.Node("", "Constant", [], [ir.AttrTensor("value", tensor)], outputs=[value],
                               name=self.name(f"{base}/constant"))
            graph.insert_before(graph[0], constant)  # no input: first in the graph is always in order
            return value
        graph.register_initializer(value)
        if self.initializers_are_inputs and graph is self.main:
            graph.inputs.append(value)
        return value

    def factor(self, graph: ir.Graph, base: str, array: np.ndarray, layer: Layer) -> ir.Value:
        """A factor initializer in the layer's storage dtype, widened by a Cast when the layer computes wider."""
        value = self.initializer(graph, base, array.astype(layer.storage_dtype.numpy(), copy=False))
        if layer.storage_dtype == layer.dtype:
            return value
        wide = ir.Value(name=self.name(f"{value.name}/cast"), type=ir.TensorType(layer.dtype), shape=value.shape)
        cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", layer.dtype)], outputs=[wide],
                       name=self.name(f"{base}/cast"))
        graph.insert_before(graph[0], cast)  # its input is an initializer: first in the graph is always in order
        return wide

    def bias(self, layer: Layer, dtype: np.dtype) -> ir.Value | None:
        """The (n,) vector added after ``X @ A @ B``; C itself when it already is one."""
        folded = folded_bias(layer)
        if folded is None:
            return None
        tensor = constant_tensor(layer.bias)
        reusable = tensor is not None and tensor.shape.numpy() == folded.shape and tensor.dtype == layer.dtype
        if reusable and layer.beta == 1.0:
            return layer.bias
        return self.initializer(_graph_of(layer.node), f"{node_label(layer.node)}.arsvd_bias", folded.astype(dtype))

    def _first(self, layer: Layer, a: ir.Value, low: ir.Value, rank: int) -> ir.Node:
        """The node that meets the activation: its output ``low`` holds the rank-k intermediate."""
        node, label = layer.node, node_label(layer.node)
        x = node.inputs[1 if layer.left or layer.is_embedding else 0]
        dims = list(x.shape) if x is not None and x.shape is not None else None
        name = self.name(f"{label}/arsvd_a")
        if layer.is_embedding:  # Gather(W, ids) -> Gather(A, ids) @ B
            low.shape = _shape(None if dims is None else [*dims, rank])
            return ir.Node("", "Gather", [a, x], [ir.AttrInt64("axis", 0)], outputs=[low], name=name)
        if layer.op_type == "Gemm" and layer.trans_x:  # X is 2-D and transposed: rows of the result are X's columns
            low.shape = _shape(None if dims is None else ([rank, dims[0]] if layer.left else [dims[1], rank]))
            attr = ir.AttrInt64("transB" if layer.left else "transA", 1)
            return ir.Node("", "Gemm", [a, x] if layer.left else [x, a], [attr], outputs=[low], name=name)
        if layer.left:
            if dims is not None:
                low.shape = ir.Shape([*dims[:-2], rank, dims[-1]] if len(dims) >= 2 else [rank])
            return ir.Node("", "MatMul", [a, x], outputs=[low], name=name)
        low.shape = _shape(None if not dims else [*dims[:-1], rank])
        return ir.Node("", "MatMul", [x, a], outputs=[low], name=name)

    def replace(self, layer: Layer, a: ir.Value, b: ir.Value, bias: ir.Value | None, rank: int) -> None:
        """Swap the layer's node for its factored form, keeping its output value's name, type and shape."""
        node, label, graph = layer.node, node_label(layer.node), _graph_of(layer.node)
        old_output = node.outputs[0]
        tensor_type = ir.TensorType(layer.dtype)
        low = ir.Value(name=self.name(f"{label}/arsvd_low_rank"), type=tensor_type)
        new_nodes = [self._first(layer, a, low, rank)]
        result = ir.Value(name=self.name(f"{label}/arsvd_product"), type=tensor_type, shape=old_output.shape)
        second = self.name(f"{label}/arsvd_b")
        if layer.left and layer.bias is not None:  # Gemm(B, low, C): C keeps the broadcast Gemm gives it
            attrs = [ir.AttrFloat32("beta", layer.beta)]
            new_nodes.append(ir.Node("", "Gemm", [b, low, layer.bias], attrs, outputs=[result], name=second))
        else:
            inputs = [b, low] if layer.left else [low, b]
            new_nodes.append(ir.Node("", "MatMul", inputs, outputs=[result], name=second))
        if bias is not None:
            product = result
            result = ir.Value(name=self.name(f"{label}/arsvd_biased"), type=tensor_type, shape=old_output.shape)
            new_nodes.append(ir.Node("", "Add", [product, bias], outputs=[result],
                                     name=self.name(f"{label}/arsvd_bias")))
        graph.insert_before(node, new_nodes)
        name, output_type, output_shape = old_output.name, old_output.type, old_output.shape
        old_output.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        result.name, result.type, result.shape = name, output_type or tensor_type, output_shape


def _drop_orphans(values: Iterable[ir.Value | None], initializers_are_inputs: bool) -> None:
    """Remove initializers, Constant nodes and weight chains that the rewrite left without a use."""
    pending = [v for v in values if v is not None]
    while pending:
        value = pending.pop()
        if value.uses() or value.is_graph_output():
            continue
        graph = value.graph
        if value.is_initializer() and graph is not None and value.name is not None and value.name in graph.initializers:
            if value.is_graph_input() and not initializers_are_inputs:
                continue  # from IR 4 such an input may be fed by the user: keep it
            del graph.initializers[value.name]
            if value in graph.inputs:  # IR < 4 lists initializers among the inputs
                graph.inputs.remove(value)
        producer = value.producer()
        if (producer is not None and producer.op_type in _DROPPABLE_PRODUCERS and producer.graph is not None
                and not any(o.uses() or o.is_graph_output() for o in producer.outputs)):
            inputs = [v for v in producer.inputs if v is not None]  # safe removal detaches them
            producer.graph.remove(producer, safe=True)
            pending.extend(inputs)


def _interface(model: ir.Model) -> list[tuple[str, str, str]]:
    """The graph's outputs and its inputs that are not initializers: name, type and shape, as strings."""
    values = [*(v for v in model.graph.inputs if not v.is_initializer()), *model.graph.outputs]
    return [(v.name or "", str(v.type), str(v.shape)) for v in values]


class FactorLayersPass(ir.passes.InPlacePass):
    """The rewrite as an onnx_ir pass, so it composes with onnx_ir's own (``Sequential``, ``PassManager``).

    Postcondition: the graph's inputs (initializers aside: IR < 4 lists new ones there) and outputs
    keep their names, types and shapes. ``rewritten`` counts the nodes replaced by the last call.
    """

    def __init__(self, plans: Sequence[WeightPlan], spill: Spill | None = None) -> None:
        super().__init__()
        self.plans = plans
        self.spill = spill
        self.rewritten = 0
        self._before: list[tuple[str, str, str]] = []

    def requires(self, model: ir.Model) -> None:
        self._before = _interface(model)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.rewritten = _rewrite(model, self.plans, self.spill)
        return ir.passes.PassResult(model, modified=self.rewritten > 0)

    def ensures(self, model: ir.Model) -> None:
        if _interface(model) != self._before:
            raise ir.passes.PostconditionError("the rewrite changed the graph's inputs or outputs")


def apply_plans(model: ir.Model, plans: Sequence[WeightPlan], spill: Spill | None = None) -> int:
    """Rewrite, in place, every node of every factored plan; returns how many nodes were rewritten.

    With a ``spill`` the factor initializers are written to it as they are made and point into it: the model then
    holds no factor in memory. The plans are not changed.
    """
    factor_pass = FactorLayersPass(plans, spill)
    factor_pass(model)
    return factor_pass.rewritten


def _rewrite(model: ir.Model, plans: Sequence[WeightPlan], spill: Spill | None) -> int:
    rewriter = _Rewriter(model, spill)
    touched: list[ir.Value | None] = []
    rewritten = 0
    for plan in plans:
        if not plan.factored or plan.factors is None:
            continue
        factors: dict[tuple[bool, float], tuple[ir.Value, ir.Value]] = {}  # one pair per orientation and alpha
        for layer in plan.layers:
            dtype = layer.dtype.numpy()
            form = (layer.left, layer.alpha)
            if form not in factors:
                first, second = stored_factors(layer, *plan.factors)
                graph = layer.weight.graph or _graph_of(layer.node)
                base = layer.weight_name or node_label(layer.node)
                factors[form] = (rewriter.factor(graph, f"{base}.arsvd_a", first, layer),
                                 rewriter.factor(graph, f"{base}.arsvd_b", second, layer))
            touched += layer.node.inputs  # all of them: a Gemm's C with beta = 0 is dropped too
            rewriter.replace(layer, *factors[form], rewriter.bias(layer, dtype), plan.rank)
            touched.append(layer.weight)
            rewritten += 1
    _drop_orphans(touched, rewriter.initializers_are_inputs)
    return rewritten
