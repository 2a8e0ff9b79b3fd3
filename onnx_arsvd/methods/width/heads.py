"""Attention heads as width units, in unfused exports of multi-head attention.

The block the matcher reads, as PyTorch exporters write it for BERT-style encoders::

    Q, K, V = X Wq (+ bq), X Wk (+ bk), X Wv (+ bv)              the entries, each h x (H * D)
    Qh = Transpose(Reshape(Q, [.., H or -1, D]), (0, 2, 1, 3))   also for V; K to (0, 2, 3, 1), or two Transposes
    P = Softmax(elementwise(Qh @ Kt, ...), axis=-1)              a scale, a mask: inputs broadcast over heads
    Y = Reshape(Transpose(P @ Vh, (0, 2, 1, 3)), [.., H * D or -1]) @ Wo (+ bo)    the exit

Head j owns columns j*D .. (j+1)*D - 1 of Q, K and V and the same rows of Wo, and nothing else mixes heads, so
removing it is removing that group of columns and rows (with H in the reshapes scaled where it is written out).
Every other shape is a refusal with its reason: rotary embeddings and grouped-query attention (their K/V paths
hold more than the reshape and transposes), a per-head input to the scores (a position bias), fused ``Attention``.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import Layer, constant_tensor
from onnx_arsvd.methods.width.units import WidthUnit, bias_add, leaks, per_unit_kind, plain_reason

__all__ = ["head_unit"]

_SCALARS = frozenset({"Mul", "Div"})
_SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity"})
_PASSING = frozenset({"Cast", "Identity", "Dropout"})
_BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Equal", "Less", "Greater", "And", "Or", "Not",
                            "Cast", "Identity", "Neg", "Max", "Min", "Pow", "Sqrt"})
_HEAD_AXIS = -3


class _Refused(Exception):
    """The block is not narrowed as heads; the message says why."""


def head_unit(exit_: Layer, entries_by_node: dict[int, Layer]) -> WidthUnit | str:
    """The heads behind ``exit_`` (an attention output projection), or why it is not one."""
    try:
        return _Match(exit_, entries_by_node).unit()
    except _Refused as refused:
        return f"not narrowed as heads: {refused}"


class _Match:
    def __init__(self, exit_: Layer, entries_by_node: dict[int, Layer]) -> None:
        self.exit, self.layers = exit_, entries_by_node
        self.region: list[ir.Node] = []
        self.per_unit: list[tuple[ir.Node, int]] = []
        self.shape_constants: list[tuple[ir.Node, int, int]] = []
        self.head_size = 0
        self.written_counts: list[int] = []

    def unit(self) -> WidthUnit:
        if reason := plain_reason(self.exit):
            raise _Refused(f"the output projection is {reason}")
        merged = self.producer(self.exit.node.inputs[0], "Reshape", "its input is not a merge of heads")
        context = self.producer(merged.inputs[0], "Transpose", "its input is not a merge of heads")
        self.expect_perm(context, (0, 2, 1, 3))
        weighted = self.producer(context.inputs[0], "MatMul", "its input is not a product of scores and values")
        if any(constant_tensor(v) is not None for v in weighted.inputs):
            raise _Refused("its input is not a product of scores and values")
        self.region += [merged, context, weighted]
        value = self.path(weighted.inputs[1], (0, 2, 1, 3), "value")
        scores = self.scores(weighted.inputs[0])
        query = self.path(scores.inputs[0], (0, 2, 1, 3), "query")
        key = self.path(scores.inputs[1], (0, 2, 3, 1), "key")
        entries = (query, key, value)
        if len({id(e.node) for e in entries}) < 3:
            raise _Refused("query, key and value are not three products")
        width = self.exit.shape[0]
        if width % self.head_size or any(e.shape[1] != width for e in entries):
            raise _Refused(f"the projections' widths do not match the output projection's {width} inputs")
        heads = width // self.head_size
        self.merge_width(merged, width)
        self.check_head_counts(heads)
        if leaks(entries, self.region, self.exit):
            raise _Refused("a value inside the attention block is used outside it")
        return WidthUnit(tuple(sorted(entries, key=lambda e: e.name)), self.exit, tuple(self.region),
                         tuple(self.per_unit), bias_add(self.exit), group=self.head_size,
                         shape_constants=tuple(self.shape_constants))

    # -- reading the block -------------------------------------------------------------------------------------

    def producer(self, value: ir.Value | None, op_type: str, reason: str) -> ir.Node:
        node = value.producer() if value is not None else None
        if node is None or node.op_type != op_type or node.domain not in ("", "ai.onnx"):
            raise _Refused(reason)
        return node

    @staticmethod
    def expect_perm(node: ir.Node, perm: tuple[int, ...]) -> None:
        if _perm(node) != perm:
            raise _Refused(f"a Transpose with perm {_perm(node)} where {perm} was expected")

    def scores(self, probabilities: ir.Value | None) -> ir.Node:
        """The product Q K^T under the softmax (the nodes in between join the region)."""
        node = probabilities.producer() if probabilities is not None else None
        while node is not None and node.op_type in _PASSING:
            self.region.append(node)
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
        if node is None or node.op_type != "Softmax" or _softmax_axis(node) not in (-1, 3):
            raise _Refused(f"{node.op_type if node else 'a graph input'} where a softmax over the keys was expected")
        self.region.append(node)
        value = node.inputs[0]
        while True:
            node = value.producer() if value is not None else None
            if node is None:
                raise _Refused("the scores are not a product")
            if node.op_type == "MatMul":
                if any(constant_tensor(v) is not None for v in node.inputs):
                    raise _Refused("the scores are a product with a constant")
                self.region.append(node)
                return node
            if node.op_type not in _SCORE_OPS:
                raise _Refused(f"{node.op_type} between the scores and the softmax")
            inner = [v for v in node.inputs if v is not None and _from_heads(v)]
            if len(inner) != 1:
                raise _Refused("the scores take an input not known to be broadcast over heads (a position bias?)")
            for other in node.inputs:
                if other is not None and other is not inner[0] and not _one_at_head_axis(other):
                    raise _Refused(f"the scores take an input that is not broadcast over heads ({other.name!r}: "
                                   "a per-head position bias?)")
            self.region.append(node)
            value = inner[0]

    def path(self, value: ir.Value | None, perm: tuple[int, ...], role: str) -> Layer:
        """The projection behind one of Q, K, V: transposes and scalar scalings back to the head split, the split,
        an optional per-unit bias, the product."""
        total: tuple[int, ...] = (0, 1, 2, 3)
        split: ir.Node | None = None
        while True:
            node = value.producer() if value is not None else None
            if node is None:
                raise _Refused(f"the {role} does not come from a product")
            if id(node) in self.layers:
                if split is None:
                    raise _Refused(f"the {role} is not split into heads by a Reshape")
                break
            if node.op_type == "Transpose" and split is None:
                total = _compose(_perm(node), total)
            elif node.op_type == "Reshape" and split is None:
                split = node
                self.split_shape(node)
            elif node.op_type in _SCALARS and _scalar_operand(node) is not None:
                pass
            elif node.op_type == "Add" and split is not None and (bias := self.bias(node)) is not None:
                if bias[2]:
                    self.per_unit.append(bias[:2])
            else:
                raise _Refused(f"{node.op_type} on the {role} path (rotary embeddings or shared key/value heads?)")
            self.region.append(node)
            value = node.inputs[0] if node.op_type in ("Transpose", "Reshape") else _inner(node)
        if total != perm:
            raise _Refused(f"the {role} heads are transposed to {total}, not {perm}")
        layer = self.layers[id(node)]
        if reason := plain_reason(layer):
            raise _Refused(f"the {role} projection is {reason}")
        return layer

    def bias(self, node: ir.Node) -> tuple[ir.Node, int, bool] | None:
        """Where a bias ``Add``'s per-unit (True) or scalar (False) constant is: the Add's operand, or the input of
        the ``Identity`` it passes through (which joins the region)."""
        for index, operand in enumerate(node.inputs):
            if operand is not None and (identity := _identity_of_constant(operand)) is not None:
                node, index, operand = identity, 0, identity.inputs[0]
                self.region.append(identity)
            if operand is not None and constant_tensor(operand) is not None:
                kind = per_unit_kind(operand, self.exit.shape[0])
                return (node, index, kind) if kind is not None else None
        return None

    # -- the shapes ------------------------------------------------------------------------------------------

    def split_shape(self, reshape: ir.Node) -> None:
        """Read a head split's target [.., heads, D]: D the head size; the head count kept where it is -1."""
        pieces = _trailing(reshape, 2)
        if pieces is None:
            raise _Refused("a head split whose last two sizes are not constants")
        (count, node, index, position), (size, *_) = pieces
        if size <= 0 or (self.head_size and size != self.head_size):
            raise _Refused(f"head splits of sizes {self.head_size} and {size}")
        self.head_size = size
        if count != -1:
            self.written_counts.append(count)
            self.write(node, index, position)

    def merge_width(self, merged: ir.Node, width: int) -> None:
        pieces = _trailing(merged, 1)
        if pieces is None or pieces[0][0] not in (-1, width):
            raise _Refused("a merge of heads whose last size is neither -1 nor the width")
        if pieces[0][0] == width:
            _, node, index, position = pieces[0]
            self.write(node, index, position)

    def write(self, node: ir.Node, index: int, position: int) -> None:
        """Note a shape entry to scale, once (the splits may share one target)."""
        if not any(n is node and i == index and p == position for n, i, p in self.shape_constants):
            self.shape_constants.append((node, index, position))

    def check_head_counts(self, heads: int) -> None:
        if any(count != heads for count in self.written_counts):
            raise _Refused("a head split's head count does not match the projections' width")


def _softmax_axis(node: ir.Node) -> int:
    """The axis a Softmax normalises over: its attribute, else the default (-1 from opset 13, 1 before: all axes
    from the second, heads included)."""
    opset = node.graph.opset_imports.get("", 13) if node.graph is not None else 13
    return node.attributes.get_int("axis", -1 if opset >= 13 else 1)


def _perm(node: ir.Node) -> tuple[int, ...]:
    attribute = node.attributes.get("perm")
    return tuple(attribute.as_ints()) if attribute is not None else ()


def _compose(first: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation of ``first`` followed by ``then`` (a Transpose's output axis i is its input axis perm[i])."""
    if len(first) != len(then):
        raise _Refused("a Transpose of another rank on a head path")
    return tuple(first[i] for i in then)


def _scalar_operand(node: ir.Node) -> int | None:
    for index, operand in enumerate(node.inputs):
        tensor = constant_tensor(operand)
        if tensor is not None and int(np.prod(tensor.shape.numpy())) == 1:
            return index
    return None


def _inner(node: ir.Node) -> ir.Value | None:
    """The non-constant operand of a binary node with one constant operand (maybe behind an ``Identity``)."""
    others = [v for v in node.inputs
              if v is not None and constant_tensor(v) is None and _identity_of_constant(v) is None]
    return others[0] if len(others) == 1 else None


def _identity_of_constant(value: ir.Value) -> ir.Node | None:
    """The ``Identity`` node that passes a constant on as ``value`` (exporters write MPNet's biases so)."""
    source = value.producer()
    return source if source is not None and source.op_type == "Identity" and constant_tensor(
        source.inputs[0]) is not None else None


def _trailing(reshape: ir.Node, count: int) -> list[tuple[int, ir.Node, int, int]] | None:
    """The last ``count`` entries of a Reshape's target, each with where it is written (node, input index,
    position), read from a constant target or from the constant pieces that end a ``Concat``; None if unknown."""
    target = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    tensor = constant_tensor(target)
    if tensor is not None:
        array = tensor.numpy().reshape(-1)
        return [(int(array[i]), reshape, 1, i) for i in range(len(array) - count, len(array))] \
            if len(array) >= count else None
    concat = target.producer() if target is not None else None
    if concat is None or concat.op_type != "Concat":
        return None
    found: list[tuple[int, ir.Node, int, int]] = []
    for index in range(len(concat.inputs) - 1, -1, -1):
        piece = constant_tensor(concat.inputs[index])
        if piece is None:
            return None
        array = piece.numpy().reshape(-1)
        found = [(int(array[i]), concat, index, i) for i in range(len(array))] + found
        if len(found) >= count:
            return found[len(found) - count:]
    return None


def _from_heads(value: ir.Value) -> bool:
    """Whether a value is computed from Q K^T (it is not a constant and not broadcast over heads)."""
    return constant_tensor(value) is None and not _one_at_head_axis(value)


def _one_at_head_axis(value: ir.Value) -> bool:
    """Whether ``value`` is known to broadcast over the head axis (size 1 there, or too few axes to reach it)."""
    known = _ones(value)
    return known is not None and (known[0] < -_HEAD_AXIS or _HEAD_AXIS in known[1])


def _ones(value: ir.Value, depth: int = 0) -> tuple[int, frozenset[int]] | None:
    """(rank, axes known to be 1, as negative indices) of ``value``, from constants, declared shapes and the
    ops masks are built with; None when unknown."""
    tensor = constant_tensor(value)
    if tensor is not None:
        return _known(tuple(int(d) for d in tensor.shape.numpy()))
    if value.shape is not None:
        declared = _known(tuple(d if isinstance(d, int) else -1 for d in value.shape.dims))
        if value.producer() is None or declared[0] < -_HEAD_AXIS or _HEAD_AXIS in declared[1]:
            return declared
    node = value.producer()
    if node is None or depth > 32 or node.domain not in ("", "ai.onnx"):
        return None
    inputs = [_ones(v, depth + 1) if v is not None else None for v in node.inputs]
    if node.op_type == "Unsqueeze":
        axes = _axes(node)
        if inputs[0] is None or axes is None:
            return None
        rank = inputs[0][0] + len(axes)
        positions = sorted(a % rank for a in axes)
        old = iter(range(-inputs[0][0], 0))
        ones = set()
        for axis in range(rank):
            if axis in positions or next(old) in inputs[0][1]:
                ones.add(axis - rank)
        return rank, frozenset(ones)
    if node.op_type in _BROADCAST_OPS:
        known = [k for k in inputs if k is not None]
        if not known or len(known) < len(inputs):
            return None
        rank = max(k[0] for k in known)
        return rank, frozenset(a for a in range(-rank, 0) if all(a < -k[0] or a in k[1] for k in known))
    return None


def _known(dims: tuple[int, ...]) -> tuple[int, frozenset[int]]:
    return len(dims), frozenset(i - len(dims) for i, d in enumerate(dims) if d == 1)


def _axes(node: ir.Node) -> list[int] | None:
    attribute = node.attributes.get("axes")
    if attribute is not None:
        return list(attribute.as_ints())
    tensor = constant_tensor(node.inputs[1]) if len(node.inputs) > 1 else None
    return [int(a) for a in tensor.numpy().reshape(-1)] if tensor is not None else None

