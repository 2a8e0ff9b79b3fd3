"""The arrays a factored layer stores: float64 factors of M turned into the graph's two matrices and bias.

``M ~ a @ b`` (a: in x k, b: k x out). The activation meets ``first`` then ``second``: for ``X @ M``
they are ``a`` and ``b``; for ``M^T @ X`` (a constant first operand) ``a^T`` and ``b^T``. Gemm's alpha
is folded in float64, split as sqrt(|alpha|) into each factor (its sign into ``first``) so neither
carries a large alpha alone; beta is folded into the bias. Everything is checked against the range
of the dtype it will be stored in before anything is written.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnx_arsvd.graph.layers import Layer, read_array

__all__ = ["folded_bias", "storage_problem", "stored_factors"]

_MAX = {
    ir.DataType.FLOAT16: float(np.finfo(np.float16).max),
    ir.DataType.BFLOAT16: 3.3895313892515355e38,
    ir.DataType.FLOAT: float(np.finfo(np.float32).max),
    ir.DataType.DOUBLE: float(np.finfo(np.float64).max),
}


def stored_factors(layer: Layer, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first, second), alpha folded in float64, oriented as the rewritten nodes multiply.

    With alpha = 1 the factors are returned as they are (no float64 copy of a large weight's factors).
    """
    if layer.alpha == 1:
        first, second = a, b
    else:
        root = float(np.sqrt(abs(layer.alpha)))
        first = np.asarray(a, np.float64) * (root if layer.alpha >= 0 else -root)
        second = np.asarray(b, np.float64) * root
    return (first.T, second.T) if layer.left else (first, second)


def folded_bias(layer: Layer) -> np.ndarray | None:
    """beta * C as an (out,) float64 vector for ``X @ M + C``; None without a bias, or when the layer keeps
    C in its own Gemm (a constant first operand: the bias is added along columns there)."""
    if layer.bias is None or layer.left:
        return None
    return layer.beta * np.broadcast_to(read_array(layer.bias).astype(np.float64).reshape(-1), (layer.shape[1],))


def storage_problem(layer: Layer, a: np.ndarray, b: np.ndarray) -> str:
    """Why the folded factors or bias cannot be stored (factors: in ``layer.storage_dtype``; bias: in the
    layer's dtype), or "" when they can."""
    bias = folded_bias(layer)
    factors = zip(("factor A", "factor B"), stored_factors(layer, a, b), strict=True)
    for what, array, dtype in (*((w, x, layer.storage_dtype) for w, x in factors), ("bias", bias, layer.dtype)):
        if array is not None and not (np.isfinite(array).all() and np.abs(array).max(initial=0.0) <= _MAX[dtype]):
            folded = f"alpha={layer.alpha:g}" if what != "bias" else f"beta={layer.beta:g}"
            return f"{what} with {folded} folded in exceeds the {dtype.name} range; kept dense"
    return ""
