"""Find the dense layers whose weight is a constant, in the main graph and in every If/Loop/Scan body.

A *layer* multiplies an activation by a constant matrix: ``MatMul(X, W)`` or ``MatMul(W, X)`` with
W a 2-D float constant, ``Gemm`` with a constant ``A`` or ``B`` (any ``transA``/``transB``, alpha, and
a bias that folds), or an embedding lookup ``Gather(W, ids)`` on axis 0 of a 2-D float table.
Constants are initializers (inline or external data), ``Constant`` nodes, or either one reached
through a chain of ``Transpose``/``Cast``/``Reshape``/``Identity`` nodes (folded with onnx's
reference implementation of each op). A body may use its own constants or capture them from an
outer scope. Every MatMul/Gemm/Gather (and every quantized matrix product) passed over carries its reason.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import UnsupportedModelError

__all__ = [
    "QUANTIZED_OPS",
    "Layer", "Skipped", "WeightKey", "constant_tensor", "filter_layers", "find_layers", "node_label", "read_array",
]

WeightKey = tuple[str, bool]
"""(scope-qualified weight value name, transposed): identifies the matrix a layer multiplies by."""

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_QUANTIZED_PRODUCERS = frozenset({"DequantizeLinear", "DynamicQuantizeLinear", "QuantizeLinear"})
QUANTIZED_OPS = frozenset({"MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm",
                           "MatMulNBits", "MatMulBnb4", "GatherBlockQuantized"})
"""Quantized layer ops: passed over, with the advice to factor the float model first."""
_CHAIN_OPS = frozenset({"Transpose", "Cast", "Reshape", "Identity"})
_SCOPE_SEPARATOR = "::"


@dataclass(frozen=True, eq=False)
class Layer:
    """One factorable node. ``shape`` is the effective matrix M's (in_features, out_features).

    ``X @ M`` is what the node computes (up to alpha and bias) for ``left=False``; for ``left=True``
    (the constant is the first operand, ``W @ X``) it computes ``M^T @ X``. ``transposed`` says M is
    the stored (or folded) matrix transposed. ``trans_x``: Gemm transposes the activation operand.
    """

    node: ir.Node
    weight: ir.Value
    transposed: bool
    alpha: float
    bias: ir.Value | None
    beta: float
    left: bool = False
    trans_x: bool = False
    scope: str = ""
    """Where the node is: "" for the main graph, else ``If_0.then_branch`` (nested: joined by ``::``)."""
    weight_scope: str = ""
    """Where the weight value is defined; its factors go there, where every use can see them."""
    chain: tuple[ir.Node, ...] = ()
    """Transpose/Cast/Reshape/Identity nodes from the constant to ``weight``, in graph order."""
    folded: ir.TensorProtocol | None = None
    """The chain's result, when there is a chain."""
    storage: ir.DataType | None = None
    """The dtype to store factors in, when narrower than the one the layer computes in (fp16 behind a Cast)."""

    @property
    def name(self) -> str:
        return _qualified(self.scope, node_label(self.node))

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def is_embedding(self) -> bool:
        """A lookup ``Gather(W, ids)``: rows of W are token vectors, not weights of a product."""
        return self.node.op_type == "Gather"

    @property
    def is_plain(self) -> bool:
        """``X @ W`` on a stored constant, as the latency guard's one-node models time it."""
        return not (self.left or self.trans_x or self.chain or self.is_embedding)

    @property
    def in_subgraph(self) -> bool:
        return bool(self.scope)

    @property
    def weight_name(self) -> str:
        return self.weight.name or ""

    @property
    def tensor(self) -> ir.TensorProtocol:
        """The matrix as stored (chain folded), before any ``transposed``."""
        return self.folded if self.folded is not None else constant_tensor(self.weight)  # type: ignore[return-value]

    @property
    def dtype(self) -> ir.DataType:
        return self.tensor.dtype

    @property
    def storage_dtype(self) -> ir.DataType:
        """The dtype factors are stored in: the weight's own, before any widening Cast."""
        return self.storage or self.dtype

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.tensor.shape.numpy()
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def weight_key(self) -> WeightKey:
        """Nodes with the same key multiply by the same matrix and share one factorization.

        Value names are unique in a scope, so the key also holds across two loads of one model.
        """
        return (_qualified(self.weight_scope, self.weight_name), self.transposed)

    def matrix(self) -> np.ndarray:
        """M (in_features x out_features) as numpy, in the weight's dtype."""
        array = self.folded.numpy() if self.folded is not None else read_array(self.weight)
        return array.T if self.transposed else array


@dataclass(frozen=True)
class Skipped:
    """A node that looks like a dense layer but is left as it is, and why."""

    name: str
    op_type: str
    reason: str


def _qualified(scope: str, name: str) -> str:
    return f"{scope}{_SCOPE_SEPARATOR}{name}" if scope else name


def node_label(node: ir.Node) -> str:
    """The node's name, or its first output's name for unnamed nodes."""
    return node.name or (node.outputs[0].name if node.outputs and node.outputs[0].name else node.op_type)


def constant_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor behind an initializer or a ``Constant`` node's output (onnx_ir's lookup), else None."""
    if value is None:
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant node (no attribute, or several): nothing we can read
        return None


def _known_tensor(value: ir.Value | None) -> ir.TensorProtocol:
    """``constant_tensor`` for a value known to be constant; an error names it otherwise."""
    tensor = constant_tensor(value)
    if tensor is None:
        raise UnsupportedModelError(f"{value.name if value is not None else 'an absent input'!r} is not a constant")
    return tensor


def read_array(value: ir.Value | None) -> np.ndarray:
    """The constant's data as numpy (memory-mapped for external data), or a clear error."""
    tensor = _known_tensor(value)
    try:
        return tensor.numpy()
    except (OSError, ValueError) as error:
        raise UnsupportedModelError(f"cannot read weight {tensor.name!r}: {error}") from None


def _resolve(value: ir.Value | None) -> tuple[ir.Value | None, tuple[ir.Node, ...]]:
    """The constant behind ``value`` and the Transpose/Cast/Reshape/Identity chain from it; (None, ()) if none."""
    chain: list[ir.Node] = []
    current = value
    while current is not None and constant_tensor(current) is None:
        producer = current.producer()
        if producer is None or producer.op_type not in _CHAIN_OPS or producer.domain not in ("", "ai.onnx"):
            return None, ()
        if producer.op_type == "Reshape" and constant_tensor(producer.inputs[1]) is None:
            return None, ()
        chain.append(producer)
        current = producer.inputs[0]
    return (current, tuple(reversed(chain))) if current is not None else (None, ())


def _fold(source: ir.Value, chain: tuple[ir.Node, ...]) -> ir.TensorProtocol:
    """The chain's result, each op evaluated by onnx's reference implementation (no graph edit)."""
    from onnx.reference import ReferenceEvaluator  # about 0.25 s to import; only weights behind a chain need it

    array = read_array(source)
    for node in chain:
        proto = ir.serde.serialize_node(node)
        feed = {proto.input[0]: array}
        if node.op_type == "Reshape":
            feed[proto.input[1]] = read_array(node.inputs[1])
        outputs = ReferenceEvaluator(proto).run(None, feed)  # a list unless intermediate=True
        array = np.asarray(outputs[0] if isinstance(outputs, list) else outputs[proto.output[0]])
    return ir.tensor(array)


def _quantized_producer(value: ir.Value | None) -> str | None:
    """The (De)QuantizeLinear op behind ``value``, through any Transpose/Cast/Reshape/Identity chain, else None."""
    producer = value.producer() if value is not None else None
    while (producer is not None and producer.op_type in _CHAIN_OPS and producer.inputs
           and producer.inputs[0] is not None):
        producer = producer.inputs[0].producer()
    return producer.op_type if producer is not None and producer.op_type in _QUANTIZED_PRODUCERS else None


_Operand = tuple[ir.Value | None, tuple[ir.Node, ...], ir.TensorProtocol | None, str]
"""What an operand resolves to: (constant source, chain, folded tensor, problem)."""


class _Finder:
    """Walks every graph of one model, turning MatMul/Gemm/Gather nodes into layers or skips."""

    def __init__(self, model: ir.Model) -> None:
        self.feedable_initializers = model.ir_version >= 4  # from IR 4 an initializer that is an input may be fed
        self.scopes: dict[int, str] = {}
        self.layers: list[Layer] = []
        self.skipped: list[Skipped] = []

    def skip(self, node: ir.Node, scope: str, reason: str) -> None:
        self.skipped.append(Skipped(_qualified(scope, node_label(node)), node.op_type, reason))

    def weight(self, value: ir.Value | None) -> _Operand:
        """(constant source, chain, folded tensor, problem); source None when the operand is not constant."""
        source, chain = _resolve(value)
        if source is None or value is None:
            return None, (), None, ""
        stored = _known_tensor(source)
        if stored.dtype not in _FLOAT_TYPES:
            return source, chain, None, f"weight has dtype {stored.dtype.name}; only float weights can be factored"
        if source.is_graph_input() and self.feedable_initializers:
            return source, chain, None, "weight is also a graph input, so a user may feed another value; left as it is"
        if value.is_graph_output():
            return source, chain, None, "weight is also a graph output"
        folded = _fold(source, chain) if chain else None
        tensor: ir.TensorProtocol = folded if folded is not None else stored
        if tensor.dtype not in _FLOAT_TYPES:
            return source, chain, None, f"weight is cast to {tensor.dtype.name}; only float weights can be factored"
        if len(tensor.shape) != 2:
            what = " after its Transpose/Cast/Reshape/Identity chain" if chain else ""
            return (source, chain, None,
                    f"weight has {len(tensor.shape)} dimensions{what}; only 2-D weights are factored")
        if 0 in tensor.shape.numpy():
            return source, chain, None, f"weight is empty (shape {list(tensor.shape.numpy())}); nothing to factor"
        return source, chain, folded, ""

    def add(self, node: ir.Node, scope: str, weight: ir.Value | None, chain: tuple[ir.Node, ...],
            folded: ir.TensorProtocol | None, **form: object) -> None:
        assert weight is not None  # callers pass an operand that resolved to a constant
        weight_scope = self.scopes.get(id(weight.graph), scope)
        storage = None
        if folded is not None and any(n.op_type == "Cast" for n in chain):
            stored = _known_tensor(chain[0].inputs[0]).dtype
            storage = stored if stored.itemsize < folded.dtype.itemsize else None
        self.layers.append(Layer(node=node, weight=weight, scope=scope, weight_scope=weight_scope, chain=chain,
                                 folded=folded, storage=storage, **form))  # type: ignore[arg-type]

    def matmul(self, node: ir.Node, scope: str) -> None:
        x, w = node.inputs[0], node.inputs[1]
        w_source, w_chain, w_folded, w_problem = self.weight(w)
        x_source, x_chain, x_folded, x_problem = self.weight(x)
        if w_source is not None and x_source is not None:
            self.skip(node, scope, "both operands are constants (a constant-folding candidate, not a layer)")
        elif w_source is not None or x_source is not None:
            left = w_source is None
            problem = x_problem if left else w_problem
            if problem:
                self.skip(node, scope, problem)
            else:
                weight, chain, folded = (x, x_chain, x_folded) if left else (w, w_chain, w_folded)
                self.add(node, scope, weight, chain, folded, transposed=left, alpha=1.0, bias=None, beta=0.0, left=left)
        elif (op := _quantized_producer(w) or _quantized_producer(x)) is not None:
            self.skip(node, scope, f"weight comes from {op} (quantized model); factor before quantizing")
        else:
            self.skip(node, scope, "neither operand is a constant (activation x activation, e.g. attention scores)")

    def gemm(self, node: ir.Node, scope: str) -> None:
        trans_a, trans_b = bool(_attr(node, "transA", 0)), bool(_attr(node, "transB", 0))
        alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
        a, b = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        b_source, b_chain, b_folded, b_problem = self.weight(b)
        a_source, a_chain, a_folded, a_problem = self.weight(a)
        if a_source is not None and b_source is not None:
            return self.skip(node, scope, "both A and B are constants (a constant-folding candidate, not a layer)")
        if a_source is None and b_source is None:
            op = _quantized_producer(b) or _quantized_producer(a)
            quantized = f"weight comes from {op} (quantized model); factor before quantizing"
            return self.skip(node, scope, quantized if op else "neither A nor B is a constant")
        left = b_source is None
        problem = a_problem if left else b_problem
        if problem:
            return self.skip(node, scope, problem)
        weight, chain, folded = (a, a_chain, a_folded) if left else (b, b_chain, b_folded)
        tensor = folded if folded is not None else _known_tensor(weight)
        if bias is not None and not left:  # X @ W + C: C must not vary along the batch rows to fold into an Add
            bias_problem = _bias_problem(bias, tensor.shape.numpy()[0 if trans_b else 1])
            if bias_problem:
                return self.skip(node, scope, bias_problem)
        if bias is None or beta == 0.0:
            bias, beta = None, 0.0
        transposed, trans_x = (not trans_a, trans_b) if left else (trans_b, trans_a)
        self.add(node, scope, weight, chain, folded, transposed=transposed, alpha=alpha, bias=bias, beta=beta,
                 left=left, trans_x=trans_x)

    def gather(self, node: ir.Node, scope: str) -> None:
        """An embedding lookup: Gather on a 2-D float constant table with computed indices; other tables are listed."""
        table, indices = node.inputs[0], node.inputs[1]
        tensor = constant_tensor(table)
        if table is None or tensor is None or len(tensor.shape) != 2 or tensor.dtype not in _FLOAT_TYPES:
            return  # index or shape arithmetic, not a table of parameters
        if constant_tensor(indices) is not None:
            return self.skip(node, scope, "indices are constants (a constant-folding candidate, not a lookup)")
        if _attr(node, "axis", 0) != 0:
            return self.skip(node, scope, "Gather along axis 1 selects columns, not embedding rows")
        if table.is_graph_input() and self.feedable_initializers:
            return self.skip(node, scope,
                             "table is also a graph input, so a user may feed another value; left as it is")
        if table.is_graph_output():
            return self.skip(node, scope, "table is also a graph output")
        self.add(node, scope, table, (), None, transposed=False, alpha=1.0, bias=None, beta=0.0)

    def walk(self, graph: ir.Graph, scope: str) -> None:
        self.scopes[id(graph)] = scope
        for node in graph:
            if node.op_type in QUANTIZED_OPS:
                self.skip(node, scope, f"quantized layer ({node.op_type}); factor the float model before quantizing")
            elif node.domain in ("", "ai.onnx") and node.op_type in ("MatMul", "Gemm", "Gather"):
                getattr(self, node.op_type.lower())(node, scope)
            for name, body in _bodies(node):
                self.walk(body, _qualified(scope, f"{node_label(node)}.{name}"))


def _bodies(node: ir.Node) -> Iterator[tuple[str, ir.Graph]]:
    """The node's subgraphs (If branches, Loop/Scan bodies), with their attribute names."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.name, attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from ((f"{attr.name}[{i}]", body) for i, body in enumerate(attr.value))


def _attr(node: ir.Node, name: str, default: float) -> float | int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _bias_problem(bias: ir.Value, out_features: int) -> str | None:
    tensor = constant_tensor(bias)
    if tensor is None:
        return "bias C is not a constant"
    shape = tensor.shape.numpy()
    if np.prod(shape, dtype=np.int64) not in (1, out_features) or any(d != 1 for d in shape[:-1]):
        return f"bias C of shape {shape} varies along the batch rows; only (n,), (1, n) or a scalar fold"
    return None


def _function_skips(model: ir.Model) -> Iterator[Skipped]:
    """Matrix products inside model-local functions: not rewritten."""
    for function in model.functions.values():
        for node in function.all_nodes():
            if node.op_type in ("MatMul", "Gemm"):
                reason = (f"inside model-local function {function.name!r}; functions are not rewritten "
                          "(inline them first, e.g. with onnx_ir.passes.common.InlinePass)")
                yield Skipped(node_label(node), node.op_type, reason)


def find_layers(model: ir.Model) -> tuple[list[Layer], list[Skipped]]:
    """All factorable layers, in the main graph and every subgraph, and the nodes passed over with why."""
    finder = _Finder(model)
    finder.walk(model.graph, "")
    finder.skipped.extend(_function_skips(model))
    return finder.layers, finder.skipped


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
            excluded.append((layer, "not matched by `include`"))
        elif exclude and _matches(layer, exclude):
            excluded.append((layer, "matched by `exclude`"))
        else:
            kept.append(layer)
    return kept, excluded
