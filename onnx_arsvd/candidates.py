"""Find the dense layers whose weight is a constant; every node passed over carries its reason.

A *layer* is ``Y = alpha * X @ W (+ bias)`` with ``W`` (m x n) constant: a ``MatMul`` whose second
input is a 2-D float constant, or a ``Gemm`` with ``transA = 0`` and a constant ``B`` (``W = B`` or
``B^T`` with ``transB``); or an embedding lookup ``Gather(W, ids)`` on axis 0 of a 2-D float
constant table (vocab x hidden). Constants are initializers (inline or external data) or
``Constant`` nodes.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import UnsupportedModelError

__all__ = ["Layer", "Skipped", "WeightKey", "constant_tensor", "filter_layers", "find_layers", "node_label", "read_array"]

WeightKey = tuple[str, bool]
"""(weight value name, transposed): identifies the matrix a layer multiplies by."""

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_QUANTIZED_PRODUCERS = frozenset({"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"})


@dataclass(frozen=True)
class Layer:
    """One factorable node. ``shape`` is the effective W's (in_features, out_features)."""

    node: ir.Node
    weight: ir.Value
    transposed: bool
    alpha: float
    bias: ir.Value | None
    beta: float

    @property
    def name(self) -> str:
        return node_label(self.node)

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def is_embedding(self) -> bool:
        """A lookup ``Gather(W, ids)``: rows of W are token vectors, not weights of a product."""
        return self.node.op_type == "Gather"

    @property
    def weight_name(self) -> str:
        return self.weight.name or ""

    @property
    def dtype(self) -> ir.DataType:
        return constant_tensor(self.weight).dtype  # type: ignore[union-attr]

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = (int(d) for d in constant_tensor(self.weight).shape)  # type: ignore[union-attr]
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def weight_key(self) -> WeightKey:
        """Nodes with the same key multiply by the same matrix and share one factorization.

        Value names are unique in a graph, so the key also holds across two loads of one model.
        """
        return (self.weight_name, self.transposed)


@dataclass(frozen=True)
class Skipped:
    """A node that looks like a dense layer but is left as it is, and why."""

    name: str
    op_type: str
    reason: str


def node_label(node: ir.Node) -> str:
    """The node's name, or its first output's name for unnamed nodes."""
    return node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type)


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind an initializer or a ``Constant`` node's output, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value
    return None


def read_array(value: ir.Value) -> np.ndarray:
    """The constant's data as numpy (memory-mapped for external data), or a clear error."""
    tensor = constant_tensor(value)
    if tensor is None:
        raise UnsupportedModelError(f"{value.name!r} is not a constant")
    try:
        return tensor.numpy()
    except (OSError, ValueError) as error:
        raise UnsupportedModelError(f"cannot read weight {value.name!r}: {error}") from None


def _weight_problem(value: ir.Value) -> str | None:
    """Why this operand cannot be a factorable weight, or None if it can."""
    tensor = constant_tensor(value)
    if tensor is None:
        producer = value.producer()
        if producer is not None and producer.op_type in _QUANTIZED_PRODUCERS:
            return f"weight comes from {producer.op_type} (quantized model); factor before quantizing"
        return "weight is not a constant"
    if tensor.dtype not in _FLOAT_TYPES:
        return f"weight has dtype {tensor.dtype.name}; only float weights can be factored"
    if len(tensor.shape) != 2:
        return f"weight has {len(tensor.shape)} dimensions; only 2-D weights are factored"
    if value.is_graph_output():
        return "weight is also a graph output"
    return None


def _attr(node: ir.Node, name: str, default: float | int) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _bias_problem(bias: ir.Value, out_features: int) -> str | None:
    tensor = constant_tensor(bias)
    if tensor is None:
        return "bias C is not a constant"
    shape = tuple(int(d) for d in tensor.shape)
    if np.prod(shape, dtype=np.int64) not in (1, out_features) or any(d != 1 for d in shape[:-1]):
        return f"bias C of shape {shape} varies along the batch rows; only (n,), (1, n) or a scalar fold"
    return None


def _inspect_matmul(node: ir.Node) -> Layer | Skipped | None:
    x, w = node.inputs[0], node.inputs[1]
    if constant_tensor(w) is None and constant_tensor(x) is not None:
        return Skipped(node_label(node), node.op_type, "constant is the first operand (W @ X); only X @ W is factored")
    if constant_tensor(w) is None and (w is None or w.producer() is None or w.producer().op_type not in _QUANTIZED_PRODUCERS):
        return None  # activation x activation (e.g. attention scores): not a dense layer
    problem = _weight_problem(w)
    if problem:
        return Skipped(node_label(node), node.op_type, problem)
    return Layer(node=node, weight=w, transposed=False, alpha=1.0, bias=None, beta=0.0)


def _inspect_gemm(node: ir.Node) -> Layer | Skipped:
    name = node_label(node)
    if _attr(node, "transA", 0):
        return Skipped(name, "Gemm", "transA=1 (activation transposed) is not supported")
    weight = node.inputs[1]
    problem = _weight_problem(weight)
    if problem:
        return Skipped(name, "Gemm", problem)
    transposed = bool(_attr(node, "transB", 0))
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None:
        out_features = int(constant_tensor(weight).shape[0 if transposed else 1])
        problem = _bias_problem(bias, out_features)
        if problem:
            return Skipped(name, "Gemm", problem)
    if bias is None or beta == 0.0:
        bias, beta = None, 0.0
    return Layer(node=node, weight=weight, transposed=transposed, alpha=alpha, bias=bias, beta=beta)


def _inspect_gather(node: ir.Node) -> Layer | Skipped | None:
    """An embedding lookup: Gather on a 2-D float constant table with computed indices."""
    table, indices = node.inputs[0], node.inputs[1]
    tensor = constant_tensor(table)
    if tensor is None or len(tensor.shape) != 2 or tensor.dtype not in _FLOAT_TYPES or constant_tensor(indices) is not None:
        return None  # shape arithmetic or constant folding, not a table lookup
    if _attr(node, "axis", 0) != 0:
        return Skipped(node_label(node), "Gather", "Gather along axis 1 selects columns, not embedding rows")
    if table.is_graph_output():
        return Skipped(node_label(node), "Gather", "table is also a graph output")
    return Layer(node=node, weight=table, transposed=False, alpha=1.0, bias=None, beta=0.0)


def _subgraph_skips(graph: ir.Graph) -> Iterable[Skipped]:
    """Dense-looking nodes inside If/Loop/Scan bodies, at any depth: not rewritten."""
    for owner in graph:
        for attr in owner.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                bodies = [attr.value]
            elif attr.type == ir.AttributeType.GRAPHS:
                bodies = list(attr.value)
            else:
                continue
            for body in bodies:
                for node in body.all_nodes():
                    if node.op_type in ("MatMul", "Gemm"):
                        reason = f"inside the {attr.name!r} subgraph of {owner.op_type} node {node_label(owner)!r}; subgraphs are not rewritten"
                        yield Skipped(node_label(node), node.op_type, reason)


def find_layers(model: ir.Model) -> tuple[list[Layer], list[Skipped]]:
    """All factorable layers of the main graph, and the dense-looking nodes passed over."""
    layers: list[Layer] = []
    skipped: list[Skipped] = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul":
            found = _inspect_matmul(node)
        elif node.op_type == "Gemm":
            found = _inspect_gemm(node)
        elif node.op_type == "Gather":
            found = _inspect_gather(node)
        else:
            continue
        if isinstance(found, Layer):
            layers.append(found)
        elif found is not None:
            skipped.append(found)
    skipped.extend(_subgraph_skips(model.graph))
    return layers, skipped


def _matches(layer: Layer, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(layer.name, p) or fnmatch.fnmatchcase(layer.weight_name, p) for p in patterns)


def filter_layers(
    layers: list[Layer], include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> tuple[list[Layer], list[tuple[Layer, str]]]:
    """Split layers into those matching an ``include`` glob and no ``exclude`` glob, and the rest with why."""
    kept: list[Layer] = []
    excluded: list[tuple[Layer, str]] = []
    for layer in layers:
        if include and not _matches(layer, include):
            excluded.append((layer, "not matched by --include"))
        elif exclude and _matches(layer, exclude):
            excluded.append((layer, "matched by --exclude"))
        else:
            kept.append(layer)
    return kept, excluded
