"""Layers inside If/Loop/Scan bodies, constant first operands and weights behind simple ops, against onnxruntime.

Every model is built with the onnx API. Forced full rank (every layer factored at rank min(m, n)) must reproduce
the original's outputs to float32 rounding (rtol 1e-4 of the output scale: far above the ~1e-6
rounding of a 16-term dot product, far below any truncation). Truncated factors must meet the
Eckart-Young bound exactly: ||alpha W - A B||_F = |alpha| sqrt(sum of the dropped s_i^2), checked on the
stored factors (float32 storage: relative 1e-4).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import EnergyPolicy, FixedRankPolicy, compress, format_report, inspect_model
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.calibration import capture_grams
from onnx_arsvd.methods.lowrank.model_plan import plan_model
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.numerics.factorize import spectrum
from onnx_arsvd.search.budget import Budget
from tests.conftest import MODELS, random_weight, run

F = TensorProto.FLOAT


def _w(m: int, n: int, seed: int, dtype: type = np.float32) -> np.ndarray:
    return random_weight(m, n, seed=seed, decay=0.15).astype(dtype)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


def _vi(name: str, dims: list, elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def _model(nodes: list, inputs: list, outputs: list, initializers: list, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for body in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(body)


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for g in _graphs(model.graph) for t in g.initializer}


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for g in _graphs(model.graph) for n in g.node]


def _full_rank(model: onnx.ModelProto, expected_factored: int) -> onnx.ModelProto:
    """Every layer factored at full rank (a fixed rank is capped at min(m, n))."""
    compressed, report = compress(model, policy=FixedRankPolicy(10**6), max_rank_fraction=1e9, min_params=0,
                                  check=False, factor_heads=True)
    assert report.factored == expected_factored, [(d.name, d.reason) for d in report.layers]
    assert all(d.rank == d.full_rank for d in report.layers)
    onnx.checker.check_model(compressed, full_check=True)
    return compressed


def _same_outputs(original: onnx.ModelProto, compressed: onnx.ModelProto, feed: dict[str, np.ndarray]) -> None:
    for expected, actual in zip(run(original, feed), run(compressed, feed), strict=True):
        assert actual.shape == expected.shape and actual.dtype == expected.dtype
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def _eckart_young(compressed: onnx.ModelProto, weight: str, matrix: np.ndarray, rank: int, left: bool = False,
                  alpha: float = 1.0) -> None:
    """The stored factors of ``weight`` (M = ``matrix``, in x out) are its best rank-k approximation."""
    inits = _initializers(compressed)
    a, b = inits[f"{weight}.arsvd_a"].astype(np.float64), inits[f"{weight}.arsvd_b"].astype(np.float64)
    product = (b @ a).T if left else a @ b  # left: the activation meets a^T then b^T
    s = spectrum(matrix.astype(np.float64)).s
    bound = abs(alpha) * np.sqrt(np.sum(s[rank:] ** 2))
    error = np.linalg.norm(alpha * matrix.astype(np.float64) - product)
    assert a.shape[0 if left else 1] == rank and bound > 0  # really truncated
    np.testing.assert_allclose(error, bound, rtol=1e-4)


# --- If: a Gemm in each branch, one on the branch's own weight, one on a weight captured from the main graph


def _if_model() -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    w_then, w_else = _w(16, 12, 1), _w(16, 12, 2)
    then_branch = helper.make_graph(
        [helper.make_node("Gemm", ["X", "Wt", "bt"], ["yt"], name="gemm_then")], "then", [], [_vi("yt", ["batch", 12])],
        initializer=[_init("Wt", w_then), _init("bt", np.full(12, 0.5, np.float32))])
    else_branch = helper.make_graph(
        [helper.make_node("Gemm", ["X", "We"], ["ye"], name="gemm_else", transB=1, alpha=0.5)], "else", [],
        [_vi("ye", ["batch", 12])])
    branch = helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=then_branch, else_branch=else_branch)
    model = _model([branch],
                   [_vi("cond", [], TensorProto.BOOL), _vi("X", ["batch", 16])], [_vi("Y", ["batch", 12])],
                   [_init("We", w_else.T.copy())])
    return model, w_then, w_else


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_if_with_a_gemm_in_each_branch() -> None:
    model, _, _ = _if_model()
    compressed = _full_rank(model, 2)
    assert "Gemm" not in _ops(compressed)
    for cond in (True, False):
        _same_outputs(model, compressed, {"cond": np.array(cond), "X": _x(5, 16)})


def test_if_truncated_meets_eckart_young_per_layer() -> None:
    model, w_then, w_else = _if_model()
    compressed, report = compress(model, policy=FixedRankPolicy(3), min_params=0, check=False, factor_heads=True)
    assert report.factored == 2
    onnx.checker.check_model(compressed, full_check=True)
    _eckart_young(compressed, "Wt", w_then, 3)
    _eckart_young(compressed, "We", w_else, 3, alpha=0.5)
    # output rows of the then-branch: ||y - y_k|| <= ||x|| s_4 (spectral norm of W - W_k)
    x = _x(7, 16, seed=1)
    feed = {"cond": np.array(True), "X": x}
    (expected,), (actual,) = run(model, feed), run(compressed, feed)
    errors = np.linalg.norm(actual - expected, axis=1)
    assert np.all(errors <= np.linalg.norm(x, axis=1) * spectrum(w_then.astype(np.float64)).s[3] * (1 + 1e-4) + 1e-5)
    assert errors.max() > 0


def test_factors_live_in_the_scope_of_the_weight() -> None:
    model, _, _ = _if_model()
    compressed = _full_rank(model, 2)
    main = {t.name for t in compressed.graph.initializer}
    branches = {a.name: {t.name for t in a.g.initializer} for a in compressed.graph.node[0].attribute}
    assert main == {"We.arsvd_a", "We.arsvd_b"}  # captured weight: factors stay where it was, W itself is gone
    assert branches["then_branch"] == {"Wt.arsvd_a", "Wt.arsvd_b", "bt"} and branches["else_branch"] == set()


# --- Loop, Scan, nesting


def _loop_model(nested: bool = False) -> tuple[onnx.ModelProto, np.ndarray]:
    """h <- tanh(h @ W) three times, W captured from the main graph; nested: the MatMul sits in an If in the body."""
    w = _w(16, 16, 3)
    product = [helper.make_node("MatMul", ["h_in", "W"], ["mm"], name="loop_matmul")]
    if nested:
        w_inner = _w(16, 16, 4)
        const = helper.make_node("Constant", [], ["W2"], value=_init("W2_value", w_inner))
        then_branch = helper.make_graph([helper.make_node("MatMul", ["h_in", "W"], ["t"], name="inner_then")], "t", [],
                                        [_vi("t", [1, 16])])
        else_branch = helper.make_graph([const, helper.make_node("MatMul", ["h_in", "W2"], ["e"], name="inner_else")],
                                        "e", [], [_vi("e", [1, 16])])
        product = [helper.make_node("If", ["flag"], ["mm"], name="inner_if", then_branch=then_branch,
                                    else_branch=else_branch)]
    body = helper.make_graph(
        [*product, helper.make_node("Tanh", ["mm"], ["h_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("h_in", [1, 16])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("h_out", [1, 16])])
    inputs = [_vi("H0", [1, 16])] + ([_vi("flag", [], TensorProto.BOOL)] if nested else [])
    model = _model([helper.make_node("Loop", ["trip", "keep_going", "H0"], ["H"], name="loop", body=body)],
                   inputs, [_vi("H", [1, 16])],
                   [_init("W", w), _init("trip", np.array(3, np.int64)), _init("keep_going", np.array(True))])
    return model, w


def test_loop_body_matmul_on_captured_weight() -> None:
    model, w = _loop_model()
    compressed = _full_rank(model, 1)
    assert "W" not in _initializers(compressed)
    _same_outputs(model, compressed, {"H0": _x(1, 16)})
    truncated, _ = compress(model, policy=FixedRankPolicy(5), min_params=0, check=False, factor_heads=True)
    _eckart_young(truncated, "W", w, 5)


def test_nested_subgraphs() -> None:
    model, _ = _loop_model(nested=True)
    compressed = _full_rank(model, 2)
    assert "Constant" not in _ops(compressed)  # the inner branch's Constant weight is replaced by its factors
    for flag in (True, False):
        _same_outputs(model, compressed, {"H0": _x(1, 16), "flag": np.array(flag)})
    names = {d.name for d in inspect_model(model, min_params=0, factor_heads=True).layers}
    assert names == {"loop.body::inner_if.then_branch::inner_then", "loop.body::inner_if.else_branch::inner_else"}


def _scan_model() -> tuple[onnx.ModelProto, np.ndarray]:
    """s_t = s_{t-1} + x_t @ Wb over a sequence; Wb is the body's own initializer; x_t is 1-D."""
    w = _w(16, 8, 5)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "Wb"], ["y_t"], name="scan_matmul"),
         helper.make_node("Add", ["s_in", "y_t"], ["s_out"]), helper.make_node("Identity", ["y_t"], ["y_out"])],
        "body", [_vi("s_in", [8]), _vi("x_t", [16])], [_vi("s_out", [8]), _vi("y_out", [8])],
        initializer=[_init("Wb", w)])
    model = _model([helper.make_node("Scan", ["S0", "Xs"], ["S", "Ys"], name="scan", body=body, num_scan_inputs=1)],
                   [_vi("S0", [8]), _vi("Xs", ["seq", 16])], [_vi("S", [8]), _vi("Ys", ["seq", 8])], [])
    return model, w


def test_scan_body() -> None:
    model, w = _scan_model()
    compressed = _full_rank(model, 1)
    _same_outputs(model, compressed, {"S0": _x(8), "Xs": _x(6, 16, seed=2)})
    truncated, _ = compress(model, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
    _eckart_young(truncated, "Wb", w, 4)


def test_weight_shared_between_main_graph_and_branches_is_factored_once() -> None:
    w = _w(16, 12, 6)
    then_branch = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["yt"], name="mm_then")], "t", [],
                                    [_vi("yt", ["batch", 12])])
    else_branch = helper.make_graph([helper.make_node("Gemm", ["X", "W"], ["ye"], name="gemm_else", alpha=2.0)], "e",
                                    [], [_vi("ye", ["batch", 12])])
    model = _model(
        [helper.make_node("MatMul", ["X", "W"], ["Y1"], name="mm_main"),
         helper.make_node("If", ["cond"], ["Y2"], name="branch", then_branch=then_branch, else_branch=else_branch)],
        [_vi("cond", [], TensorProto.BOOL), _vi("X", ["batch", 16])],
        [_vi("Y1", ["batch", 12]), _vi("Y2", ["batch", 12])],
        [_init("W", w)])
    compressed = _full_rank(model, 3)
    report = inspect_model(model, min_params=0, factor_heads=True)
    assert {d.shared_by for d in report.layers} == {3}
    # one factorization: alpha 1 (main, then) shares one pair, alpha 2 gets its scaled pair; all in the main graph
    assert {t.name for t in compressed.graph.initializer} == {"W.arsvd_a", "W.arsvd_b", "W.arsvd_a_1", "W.arsvd_b_1"}
    assert all(not a.g.initializer for a in compressed.graph.node[-1].attribute)
    for cond in (True, False):
        _same_outputs(model, compressed, {"cond": np.array(cond), "X": _x(4, 16)})


# --- constant first operand


@pytest.mark.parametrize("x_dims", [[16, 5], [2, 3, 16, 5], [16]], ids=["2d", "4d", "1d"])
def test_matmul_with_constant_first_operand(x_dims: list[int]) -> None:
    w = _w(12, 16, 7)
    out = [12, *x_dims[1:]] if len(x_dims) == 2 else [*x_dims[:-2], 12, x_dims[-1]] if len(x_dims) > 2 else [12]
    model = _model([helper.make_node("MatMul", ["W", "X"], ["Y"], name="left")], [_vi("X", x_dims)], [_vi("Y", out)],
                   [_init("W", w)])
    compressed = _full_rank(model, 1)
    _same_outputs(model, compressed, {"X": _x(*x_dims)})
    truncated, _ = compress(model, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
    _eckart_young(truncated, "W", w.T, 4, left=True)


@pytest.mark.parametrize("trans", [(0, 0), (1, 1)], ids=["plain", "transA-transB"])
def test_gemm_with_constant_first_operand_keeps_its_bias(trans: tuple[int, int]) -> None:
    w = _w(12, 16, 8)  # Y = alpha W X + beta C, C a (12, 1) column bias broadcast along X's columns
    stored = w.T.copy() if trans[0] else w
    x_dims = [5, 16] if trans[1] else [16, 5]
    model = _model([helper.make_node("Gemm", ["W", "X", "C"], ["Y"], name="left_gemm", transA=trans[0], transB=trans[1],
                                     alpha=0.5, beta=2.0)],
                   [_vi("X", x_dims)], [_vi("Y", [12, 5])], [_init("W", stored), _init("C", _x(12, 1, seed=3))])
    compressed = _full_rank(model, 1)
    _same_outputs(model, compressed, {"X": _x(*x_dims)})


def test_gemm_trans_a_on_the_activation() -> None:
    w = _w(16, 12, 9)
    model = _model([helper.make_node("Gemm", ["X", "W", "C"], ["Y"], name="ta", transA=1)],
                   [_vi("X", [16, "batch"])], [_vi("Y", ["batch", 12])], [_init("W", w), _init("C", _x(12, seed=4))])
    compressed = _full_rank(model, 1)
    _same_outputs(model, compressed, {"X": _x(16, 6)})


# --- weights behind Transpose / Cast / Reshape / Identity


def _chain(kind: str) -> tuple[list, list, np.ndarray]:
    """(nodes making 'Weff' (16 x 12, float32), initializers, the effective matrix)."""
    w = _w(16, 12, 10)
    if kind == "transpose":
        return [helper.make_node("Transpose", ["W"], ["Weff"], perm=[1, 0])], [_init("W", w.T.copy())], w
    if kind == "cast":
        w16 = w.astype(np.float16)
        return [helper.make_node("Cast", ["W"], ["Weff"], to=F)], [_init("W", w16)], w16.astype(np.float32)
    if kind == "reshape":
        return ([helper.make_node("Reshape", ["W", "shape"], ["Weff"])],
                [_init("W", w.reshape(-1)), _init("shape", np.array([16, -1], np.int64))], w)
    if kind == "identity":
        return [helper.make_node("Identity", ["W"], ["Weff"])], [_init("W", w)], w
    w16 = w.astype(np.float16)  # Cast -> Transpose -> Identity
    return ([helper.make_node("Cast", ["W"], ["c"], to=F), helper.make_node("Transpose", ["c"], ["t"]),
             helper.make_node("Identity", ["t"], ["Weff"])], [_init("W", w16.T.copy())], w16.astype(np.float32))


@pytest.mark.parametrize("kind", ["transpose", "cast", "reshape", "identity", "cast-transpose-identity"])
def test_weight_behind_a_chain_is_factored_and_the_chain_dropped(kind: str) -> None:
    nodes, initializers, matrix = _chain(kind)
    model = _model([*nodes, helper.make_node("MatMul", ["X", "Weff"], ["Y"], name="dense")],
                   [_vi("X", ["batch", 16])], [_vi("Y", ["batch", 12])], initializers)
    compressed = _full_rank(model, 1)
    factors = _initializers(compressed)
    assert set(factors) == {"Weff.arsvd_a", "Weff.arsvd_b"}
    if kind.startswith("cast"):  # fp16 storage, fp32 compute: factors stay fp16, each widened by one Cast
        assert _ops(compressed) == ["Cast", "Cast", "MatMul", "MatMul"]
        assert {f.dtype for f in factors.values()} == {np.dtype(np.float16)}
    else:
        assert _ops(compressed) == ["MatMul", "MatMul"]
    feed = {"X": _x(5, 16)}
    (expected,), (actual,) = run(model, feed), run(compressed, feed)
    # fp16 factors round each entry by up to 2^-11 relative; over a 16-term product with random signs that is a few
    # 1e-4 of the output scale (measured 2e-4), so 1e-3
    tolerance = 1e-3 if kind.startswith("cast") else 1e-4
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
    truncated, _ = compress(model, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
    _eckart_young(truncated, "Weff", matrix, 4)


def test_chain_used_elsewhere_is_kept() -> None:
    nodes, initializers, _ = _chain("transpose")
    model = _model([*nodes, helper.make_node("MatMul", ["X", "Weff"], ["Y"], name="dense"),
                    helper.make_node("ReduceSum", ["Weff"], ["S"], keepdims=0)],
                   [_vi("X", ["batch", 16])], [_vi("Y", ["batch", 12]), _vi("S", [])], initializers)
    compressed = _full_rank(model, 1)
    assert "Transpose" in _ops(compressed) and "W" in _initializers(compressed)
    _same_outputs(model, compressed, {"X": _x(5, 16)})


# --- folding alpha into float16 factors


def _fp16_gemm(alpha: float) -> onnx.ModelProto:
    """W = 0.01 everywhere (256 x 256): rank 1, s = 2.56, so A = U sqrt(S) has entries 0.1 before alpha."""
    return _model([helper.make_node("Gemm", ["X", "W"], ["Y"], name="big_alpha", alpha=alpha)],
                  [_vi("X", [1, 256], TensorProto.FLOAT16)], [_vi("Y", [1, 256], TensorProto.FLOAT16)],
                  [_init("W", np.full((256, 256), 0.01, np.float16))])


def test_float16_gemm_with_large_alpha_stays_finite() -> None:
    """alpha = 1e6 folded into A alone gave entries of 1e5 (inf in float16); split, each factor holds 1e3 x 0.1."""
    model = _fp16_gemm(1e6)
    compressed, report = compress(model, policy=FixedRankPolicy(1), min_params=0, check=False, factor_heads=True)
    assert report.factored == 1
    feed = {"X": np.full((1, 256), 1e-4, np.float16)}
    (expected,), (actual,) = run(model, feed), run(compressed, feed)
    assert np.isfinite(actual).all()  # the original gives 256 (= 1e6 * 256 * 1e-4 * 0.01, to float16 rounding)
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=1e-2)


def test_float16_factors_beyond_range_keep_the_layer_dense() -> None:
    """alpha = 1e12: even split, each factor entry is 1e6 x 0.1 > 65504, so the layer is left as it is."""
    model = _fp16_gemm(1e12)
    compressed, report = compress(model, policy=FixedRankPolicy(1), min_params=0, check=False, factor_heads=True)
    (decision,) = report.layers
    assert not decision.factored
    assert decision.reason == "factor A with alpha=1e+12 folded in exceeds the FLOAT16 range; kept dense"
    assert [n.op_type for n in compressed.graph.node] == ["Gemm"]


def test_float16_gemm_with_moderate_alpha_is_split_between_factors() -> None:
    """alpha = 300: folded into one factor it would be 300 * 10 = 3000 per entry, split it is ~170: both fit."""
    w = (random_weight(64, 48, true_rank=4, seed=11) * 3).astype(np.float16)
    model = _model([helper.make_node("Gemm", ["X", "W"], ["Y"], name="alpha300", alpha=300.0)],
                   [_vi("X", [3, 64], TensorProto.FLOAT16)], [_vi("Y", [3, 48], TensorProto.FLOAT16)], [_init("W", w)])
    compressed, report = compress(model, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
    assert report.factored == 1
    feed = {"X": (_x(3, 64) * 0.01).astype(np.float16)}
    (expected,), (actual,) = run(model, feed), run(compressed, feed)
    # float16 keeps ~3 decimal digits; two chained products round twice
    np.testing.assert_allclose(actual.astype(np.float32), expected.astype(np.float32), rtol=2e-2,
                               atol=2e-2 * np.abs(expected.astype(np.float32)).max())


# --- calibration


class _Reader:
    """The CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _main_and_loop_model() -> onnx.ModelProto:
    """h = X @ W0 in the main graph, then h <- tanh(h @ W1) twice in a Loop body (W1 captured)."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W1"], ["mm"], name="body_matmul"),
         helper.make_node("Tanh", ["mm"], ["h_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("h_in", ["batch", 16])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("h_out", ["batch", 16])])
    return _model([helper.make_node("MatMul", ["X", "W0"], ["h"], name="main_matmul"),
                   helper.make_node("Loop", ["trip", "keep_going", "h"], ["H"], name="loop", body=body)],
                  [_vi("X", ["batch", 16])], [_vi("H", ["batch", 16])],
                  [_init("W0", _w(16, 16, 12)), _init("W1", _w(16, 16, 13)), _init("trip", np.array(2, np.int64)),
                   _init("keep_going", np.array(True))])


def test_calibration_captures_inside_a_loop_body() -> None:
    """W1's Gram matrix sums its inputs over both iterations: h = X @ W0, then tanh(h @ W1)."""
    model = _main_and_loop_model()
    layers, _ = find_layers(ir.from_proto(model))
    feeds = [{"X": _x(8, 16, seed=s)} for s in range(3)]
    grams = capture_grams(ir.from_proto(model), layers, _Reader(feeds))
    w0, w1 = (numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer[:2])
    rows = np.concatenate([f["X"] for f in feeds]).astype(np.float64)
    first = rows @ w0
    second = np.tanh(first @ w1)
    np.testing.assert_allclose(grams[("W0", False)], rows.T @ rows, rtol=1e-6)
    expected = first.T @ first + second.T @ second  # h_in of iteration 1, then of iteration 2
    np.testing.assert_allclose(grams[("W1", False)], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    compressed, report = compress(model, method="whitened", calibration=_Reader(feeds), policy=FixedRankPolicy(10**6),
                                  max_rank_fraction=1e9, min_params=0, check=False)
    assert report.factored == 2 and not any("no activations were captured" in note for note in report.notes)
    _same_outputs(model, compressed, {"X": _x(5, 16, seed=9)})  # whitened factors are exact at full rank too


def test_calibration_inside_if_branches_sees_only_the_rows_each_branch_ran_on() -> None:
    model, _, _ = _if_model()
    layers, _ = find_layers(ir.from_proto(model))
    x_then, x_else = _x(6, 16, seed=1), _x(4, 16, seed=2)
    feeds = [{"cond": np.array(True), "X": x_then}, {"cond": np.array(False), "X": x_else}]
    grams = capture_grams(ir.from_proto(model), layers, _Reader(feeds))
    x_then, x_else = x_then.astype(np.float64), x_else.astype(np.float64)
    np.testing.assert_allclose(grams[("branch.then_branch::Wt", False)], x_then.T @ x_then, rtol=1e-6)
    np.testing.assert_allclose(grams[("We", True)], x_else.T @ x_else, rtol=1e-6)
    # a branch the data never takes gets no Gram matrix: plain factors, and the report says so
    only_then = [{"cond": np.array(True), "X": x_then.astype(np.float32)}]
    assert set(capture_grams(ir.from_proto(model), layers, _Reader(only_then))) == {("branch.then_branch::Wt", False)}
    _, report = compress(model, method="whitened", calibration=_Reader(only_then), policy=FixedRankPolicy(3),
                         min_params=0, check=False)
    assert [n for n in report.notes if "no activations were captured" in n] == [
        "note: no activations were captured for 1 weight(s) (an If branch the data never takes, or a loop body whose "
        "activations change shape between iterations); they got plain SVD factors: We"]


def test_calibration_inside_nested_bodies_and_a_scan() -> None:
    model, _ = _loop_model(nested=True)
    layers, _ = find_layers(ir.from_proto(model))
    h0 = _x(1, 16)
    grams = capture_grams(ir.from_proto(model), layers, _Reader([{"H0": h0, "flag": np.array(True)}]))
    w = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    states = [h0.astype(np.float64)]
    for _ in range(2):  # the inner then-branch sees h before each of the 3 iterations
        states.append(np.tanh(states[-1] @ w))
    rows = np.concatenate(states)
    np.testing.assert_allclose(grams[("W", False)], rows.T @ rows, rtol=1e-4, atol=1e-6)
    scan, w_scan = _scan_model()
    xs = _x(6, 16, seed=2)
    (scan_layer,), _ = find_layers(ir.from_proto(scan))
    grams = capture_grams(ir.from_proto(scan), [scan_layer], _Reader([{"S0": _x(8), "Xs": xs}]))
    np.testing.assert_allclose(grams[scan_layer.weight_key], xs.T.astype(np.float64) @ xs, rtol=1e-5)
    assert w_scan.shape == (16, 8)


def test_gram_of_a_constant_first_operand_is_over_columns() -> None:
    model = _model([helper.make_node("MatMul", ["W", "X"], ["Y"], name="left")], [_vi("X", ["b", 16, 5])],
                   [_vi("Y", ["b", 12, 5])], [_init("W", _w(12, 16, 14))])
    layers, _ = find_layers(ir.from_proto(model))
    x = _x(3, 16, 5)
    grams = capture_grams(ir.from_proto(model), layers, _Reader([{"X": x}]))
    columns = np.swapaxes(x, 1, 2).reshape(-1, 16).astype(np.float64)  # each column of X meets W
    np.testing.assert_allclose(grams[layers[0].weight_key], columns.T @ columns, rtol=1e-6)


# --- a real exported model: torch.onnx writes the data-dependent branch as an If (models/train_branch_mlp.py)


def _digits_accuracy(model: onnx.ModelProto | str, flag: float) -> tuple[float, np.ndarray]:
    with np.load(MODELS / "digits_test.npz") as data:
        x, labels = data["input"], data["labels"]
    (logits,) = run(model, {"input": x, "branch": np.array([flag], np.float32)})
    return float(np.mean(logits.argmax(axis=1) == labels)), logits


def test_real_exported_if_model_is_compressed_and_verified() -> None:
    path = str(MODELS / "branch_mlp.onnx")
    model = onnx.load(path)
    assert [n.op_type for n in model.graph.node if n.op_type == "If"] == ["If"]
    full = _full_rank(model, 4)
    for flag in (1.0, -1.0):  # both branches, on the 540 real test images
        _, expected = _digits_accuracy(model, flag)
        _, actual = _digits_accuracy(full, flag)
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    compressed, report = compress(path, policy=EnergyPolicy(0.9), check=False, factor_heads=True)
    factored = {d.name for d in report.layers if d.factored}
    assert {"/If.then_branch::/relu_branch/Gemm", "/If.else_branch::/tanh_branch/Gemm"} <= factored
    proto = ir.to_proto(compressed)
    onnx.checker.check_model(proto, full_check=True)
    for flag in (1.0, -1.0):
        before, _ = _digits_accuracy(model, flag)
        after, _ = _digits_accuracy(proto, flag)
        # tau = 0.9 keeps 90% of each weight's energy; on the shipped digits MLP it lost no test image. Allow 2 points
        # (11 of 540 images) so the test checks that the branches still classify, not one lucky rounding
        assert after >= before - 0.02, (flag, before, after)


def test_inspect_says_what_share_of_the_parameters_is_factorable() -> None:
    model = onnx.load(MODELS / "branch_mlp.onnx")
    tensors = [numpy_helper.to_array(t) for g in _graphs(model.graph) for t in g.initializer]
    tensors += [numpy_helper.to_array(a.t) for g in _graphs(model.graph) for n in g.node if n.op_type == "Constant"
                for a in n.attribute if a.name == "value"]
    total = sum(t.size for t in tensors)
    dense = sum(t.size for t in tensors if t.ndim == 2)  # the four Linear weights; biases and scalars are 0-/1-D
    report = inspect_model(MODELS / "branch_mlp.onnx", factor_heads=True)
    assert report.params_before == total and report.dense_params_before == dense
    assert (f"factorable layers hold {dense / 1e3:.1f}k of the model's {total / 1e3:.1f}k parameters "
            f"({dense / total:.1%})") in format_report(report)


def test_calibration_on_the_real_if_model_sees_each_branch_on_its_own_rows() -> None:
    model = ir.load(MODELS / "branch_mlp.onnx")
    layers, _ = find_layers(model)
    with np.load(MODELS / "digits_test.npz") as data:
        x = data["input"]
    feeds = [{"input": x[:300], "branch": np.array([1.0], np.float32)},
             {"input": x[300:], "branch": np.array([-1.0], np.float32)}]
    grams = capture_grams(model, layers, _Reader(feeds))
    weights = {name: value.const_value.numpy().astype(np.float64) for name, value in model.graph.initializers.items()}
    hidden = np.maximum(x.astype(np.float64) / 16 @ weights["trunk.weight"].T + weights["trunk.bias"], 0)  # the trunk
    for key, rows in ((("relu_branch.weight", True), hidden[:300]), (("tanh_branch.weight", True), hidden[300:])):
        np.testing.assert_allclose(grams[key], rows.T @ rows, rtol=1e-4, atol=1e-4 * np.abs(rows.T @ rows).max())


def _alternating_loop(then_branch: onnx.GraphProto, w: np.ndarray, w0: np.ndarray) -> onnx.ModelProto:
    """X @ W0, then a 3-iteration Loop whose If takes ``then_branch`` on even iterations and Neg otherwise."""
    else_branch = helper.make_graph([helper.make_node("Neg", ["h_in"], ["e"])], "e", [], [_vi("e", ["batch", 16])])
    body = helper.make_graph(
        [helper.make_node("Mod", ["i", "two"], ["r"]), helper.make_node("Equal", ["r", "zero"], ["even"]),
         helper.make_node("If", ["even"], ["mm"], name="alt_if", then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Tanh", ["mm"], ["h_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [_vi("i", [], TensorProto.INT64), _vi("c_in", [], TensorProto.BOOL), _vi("h_in", ["batch", 16])],
        [_vi("c_out", [], TensorProto.BOOL), _vi("h_out", ["batch", 16])])
    return _model([helper.make_node("MatMul", ["X", "W0"], ["h0"], name="main_mm"),
                   helper.make_node("Loop", ["trip", "keep_going", "h0"], ["H"], name="loop", body=body)],
                  [_vi("X", ["batch", 16])], [_vi("H", ["batch", 16])],
                  [_init("W", w), _init("W0", w0), _init("trip", np.array(3, np.int64)),
                   _init("keep_going", np.array(True)), _init("two", np.array(2, np.int64)),
                   _init("zero", np.array(0, np.int64))])


def test_calibration_falls_back_when_a_loop_alternates_branches() -> None:
    """An If inside a Loop taking the then-branch on even iterations only, its MatMul on a value computed in the
    branch: the lifted activation is (4, 16) in some iterations and empty in others, which onnxruntime cannot
    stack; body weights then get plain factors."""
    then_branch = helper.make_graph([helper.make_node("Relu", ["h_in"], ["relu"]),
                                     helper.make_node("MatMul", ["relu", "W"], ["t"], name="alt_then")], "t", [],
                                    [_vi("t", ["batch", 16])])
    model = _alternating_loop(then_branch, _w(16, 16, 3), _w(16, 16, 5))
    layers, _ = find_layers(ir.from_proto(model))
    feeds = [{"X": _x(4, 16, seed=s)} for s in range(2)]
    grams = capture_grams(ir.from_proto(model), layers, _Reader(feeds))
    rows = np.concatenate([f["X"] for f in feeds]).astype(np.float64)
    assert set(grams) == {("W0", False)}  # both feeds still count for the main-graph layer
    np.testing.assert_allclose(grams[("W0", False)], rows.T @ rows, rtol=1e-6)
    compressed, report = compress(model, method="whitened", calibration=_Reader(feeds), policy=FixedRankPolicy(10**6),
                                  max_rank_fraction=1e9, min_params=0, check=False)
    assert report.factored == 2 and any(n.endswith("they got plain SVD factors: W") for n in report.notes)
    _same_outputs(model, compressed, {"X": _x(3, 16, seed=7)})


def test_calibration_in_a_loop_that_alternates_branches_on_a_visible_value() -> None:
    """The then-branch (even iterations) multiplies h_in, a value the else-branch sees too: the else-branch
    outputs zeros of h_in's shape, so the loop stacks one shape and W counts the rows of iterations 0 and 2."""
    then_branch = helper.make_graph([helper.make_node("MatMul", ["h_in", "W"], ["t"], name="alt_then")], "t", [],
                                    [_vi("t", ["batch", 16])])
    w, w0 = _w(16, 16, 3), _w(16, 16, 5)
    model = _alternating_loop(then_branch, w, w0)
    layers, _ = find_layers(ir.from_proto(model))
    x = _x(4, 16)
    grams = capture_grams(ir.from_proto(model), layers, _Reader([{"X": x}]))
    h0 = x.astype(np.float64) @ w0
    h2 = np.tanh(-np.tanh(h0 @ w))  # iteration 0 (then), iteration 1 (else: tanh(-h))
    expected = h0.T @ h0 + h2.T @ h2
    np.testing.assert_allclose(grams[("W", False)], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("allocation", ["global", "threshold"])
def test_a_budget_on_the_real_if_model_keeps_the_branch_its_data_never_takes_dense(tmp_path: Path,
                                                                                   allocation: str) -> None:
    """``branch`` is one value per call, given once beside the 540 images. The data takes the ReLU branch only:
    the Tanh branch's predicted loss would be 0 at any rank (no activations, no response), so the global allocation
    used to factor it to rank 2 for free, and the model lost 57 points when the other branch ran; one threshold gave
    it plain factors that nothing judged."""
    with np.load(MODELS / "digits_test.npz") as data:
        x, labels = data["input"], data["labels"]
    out = tmp_path / "small.onnx"
    _, report = compress(MODELS / "branch_mlp.onnx", out, budget=Budget(max_drop=1.0, allocation=allocation),
                         data={"input": x, "branch": np.array([1.0], np.float32), "labels": labels})
    decisions = {d.name: d for d in report.layers}
    assert decisions["/trunk/Gemm"].factored
    tanh = decisions["/If.else_branch::/tanh_branch/Gemm"]
    assert not tanh.factored
    if allocation == "global":
        assert "never reached it" in tanh.reason
    else:  # the threshold plans every weight, then keeps the unreached one dense, and the report notes it
        assert any("stay dense: tanh_branch.weight" in note for note in report.notes), report.notes
    before, _ = _digits_accuracy(str(MODELS / "branch_mlp.onnx"), -1.0)
    after, _ = _digits_accuracy(str(out), -1.0)
    assert after >= before - 0.01


@pytest.mark.parametrize("unreached_dense", [False, True])
def test_a_weight_the_calibration_never_reaches_gets_plain_factors_or_stays_dense(unreached_dense: bool) -> None:
    with np.load(MODELS / "digits_test.npz") as data:
        calibration = {"input": data["input"], "branch": np.array([1.0], np.float32)}  # the ReLU branch only
    settings = Settings(policy=EnergyPolicy(0.5), method="whitened", calibration=calibration,
                        unreached_dense=unreached_dense)
    planned = plan_model(ir.load(MODELS / "branch_mlp.onnx"), settings, with_factors=False)
    tanh = next(d for plan in planned.plans for d in plan.decisions if d.weight == "tanh_branch.weight")
    assert tanh.factored != unreached_dense
    assert ("never reached it" in tanh.reason) == unreached_dense
    assert any(("stay dense" if unreached_dense else "got plain SVD factors") in note for note in planned.notes)
