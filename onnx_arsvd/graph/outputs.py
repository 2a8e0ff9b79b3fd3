"""What each graph output is, from the ops that make it: decisions (class scores or probabilities on its last axis),
a score per sample (one value, decided by a threshold), or values (embeddings, hidden states, anything else).

The kind chooses the metric that judges the output (:mod:`onnx_arsvd.measure.agreement`): the cosine of a
one-element vector is always 1, and logits at cosine 0.994 can flip 6% of a classifier's decisions.
"""

from __future__ import annotations

import math

import onnx_ir as ir

__all__ = ["DECISIONS", "SCORE", "VALUES", "output_kinds"]

DECISIONS, SCORE, VALUES = "decisions", "score", "values"

_SHAPE_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "Cast"})
_DECIDING = frozenset({"Softmax", "LogSoftmax", "Sigmoid", "HardSigmoid", "ArgMax", "ArgMin"})


def _maker(value: ir.Value) -> ir.Node | None:
    """The op that makes ``value``, through shape ops and a bias ``Add``."""
    node = value.producer()
    while node is not None and (node.op_type in _SHAPE_OPS or (
            node.op_type == "Add" and any(v is not None and v.const_value is not None for v in node.inputs))):
        source = next((v for v in node.inputs if v is not None and v.const_value is None), None)
        node = source.producer() if source is not None else None
    return node


def _decides(node: ir.Node | None) -> bool:
    """A softmax or sigmoid (in one op, or spelled Exp ... Div), an argmax, or a dense layer on a constant weight
    (a head: its outputs are class scores)."""
    if node is None:
        return False
    if node.op_type in _DECIDING:
        return True
    if node.op_type == "Div":
        return any(v is not None and (p := v.producer()) is not None and p.op_type == "Exp" for v in node.inputs)
    if node.op_type in ("Gemm", "MatMul"):
        return any(v is not None and v.const_value is not None for v in node.inputs[:2])
    return False


def _per_sample(value: ir.Value) -> int | None:
    """Values per sample (past the first axis) when the declared shape fixes them."""
    if value.shape is None:
        return None
    dims = list(value.shape)[1:]
    fixed = [d for d in dims if isinstance(d, int)]
    return math.prod(fixed) if len(fixed) == len(dims) else None


def _unbatched(value: ir.Value, batch_dims: set[int | str]) -> bool:
    """Whether ``value`` is one vector of a fixed length that no input's first axis shares: the class scores of a
    model without a sample axis (a [10] output of an [64] input), not ten samples' scores."""
    if value.shape is None or len(value.shape) != 1:
        return False
    (dim,) = value.shape
    return isinstance(dim, int) and dim > 1 and dim not in batch_dims


def output_kinds(model: ir.Model) -> dict[str, str]:
    """Each graph output's kind, by name."""
    batch_dims = {value.shape[0] if isinstance(value.shape[0], int) else str(value.shape[0])
                  for value in model.graph.inputs if value.shape is not None and len(value.shape)}
    kinds = {}
    for value in model.graph.outputs:
        kind = VALUES
        if value.dtype is not None and value.dtype.is_floating_point() and _decides(_maker(value)):
            kind = SCORE if _per_sample(value) == 1 and not _unbatched(value, batch_dims) else DECISIONS
        kinds[value.name or ""] = kind
    return kinds
