"""Rewritten models against onnxruntime's outputs for the originals, for every Gemm/MatMul form.

Tolerances: an exactly low-rank weight must match to float32 rounding (rtol 1e-4 of the output
scale, far above the ~1e-6 rounding of a 32-term dot product and far below any real truncation);
a truncated weight's per-row error obeys ||x (W - AB)|| <= ||x|| * s_{k+1} (Eckart-Young, spectral norm).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest

from onnx_arsvd import EnergyPolicy, FixedRankPolicy, compress
from onnx_arsvd.methods.lowrank.model_plan import plan_model
from onnx_arsvd.methods.lowrank.rewrite import FactorLayersPass
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.numerics.factorize import spectrum
from tests.conftest import initializer_names, make_linear_model, make_mlp, random_weight, run

GEMM_FORMS = [
    {"op": "Gemm"},
    {"op": "Gemm", "trans_b": True},
    {"op": "Gemm", "bias": "1n"},
    {"op": "Gemm", "bias": "scalar"},
    {"op": "Gemm", "bias": None},
    {"op": "Gemm", "alpha": 0.5, "beta": 2.0, "trans_b": True},
    {"op": "Gemm", "beta": 0.0},
    {"op": "Gemm", "opset": 7, "ir_version": 3},
    {"op": "Gemm", "opset": 9, "ir_version": 4, "trans_b": True},
]
MATMUL_FORMS = [
    {"op": "MatMul"},  # [batch, seq, m]
    {"op": "MatMul", "x_shape": ("batch", 32)},
    {"op": "MatMul", "x_shape": (2, 3, 5, 32)},
    {"op": "MatMul", "x_shape": (32,)},
    {"op": "MatMul", "weight_as_constant_node": True},
    {"op": "MatMul", "opset": 7, "ir_version": 3},
]


def _feed(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    dims = [d.dim_value or 3 for d in model.graph.input[0].type.tensor_type.shape.dim]
    elem = onnx.helper.tensor_dtype_to_np_dtype(model.graph.input[0].type.tensor_type.elem_type)
    return {"X": np.random.default_rng(seed).standard_normal(dims).astype(elem)}


def _compressed(model: onnx.ModelProto, rank: int) -> onnx.ModelProto:
    result, report = compress(model, policy=FixedRankPolicy(rank), min_params=0, check=False, factor_heads=True)
    assert report.factored == 1
    return result


@pytest.mark.parametrize("form", GEMM_FORMS + MATMUL_FORMS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_exactly_low_rank_weight_reproduces_original(form: dict) -> None:
    model = make_linear_model(true_rank=4, **form)
    compressed = _compressed(model, 4)
    onnx.checker.check_model(compressed, full_check=True)
    assert [n.op_type for n in compressed.graph.node if n.op_type != "Constant"][:2] == ["MatMul", "MatMul"]
    feed = _feed(model)
    (expected,), (actual,) = run(model, feed), run(compressed, feed)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("form", [{"op": "Gemm", "trans_b": True, "alpha": 2.0}, {"op": "MatMul"}])
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_truncated_weight_error_within_eckart_young(form: dict, rank: int) -> None:
    model = make_linear_model(decay=0.05, **form)
    w = random_weight(32, 24, decay=0.05) * form.get("alpha", 1.0)
    bound = spectrum(w).s[rank]  # spectral norm of W - W_k
    feed = _feed(model, seed=1)
    (expected,), (actual,) = run(model, feed), run(_compressed(model, rank), feed)
    x = feed["X"].reshape(-1, 32).astype(np.float64)
    row_errors = np.linalg.norm((actual - expected).reshape(-1, 24), axis=1)
    assert np.all(row_errors <= np.linalg.norm(x, axis=1) * bound * (1 + 1e-4) + 1e-4)
    assert np.max(row_errors) > 0  # truncation really happened


def test_float16_weights_stay_float16() -> None:
    model = make_linear_model(op="MatMul", true_rank=4, dtype=np.float16)
    compressed = _compressed(model, 4)
    dtypes = {t.name: t.data_type for t in compressed.graph.initializer}
    assert set(dtypes.values()) == {onnx.TensorProto.FLOAT16}
    feed = _feed(model)
    (expected,), (actual,) = run(model, feed), run(compressed, feed)
    assert actual.dtype == np.float16
    # float16 keeps ~3 decimal digits; two chained products round twice
    np.testing.assert_allclose(actual, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


def test_interface_and_opset_are_kept_and_orphans_dropped() -> None:
    model = make_linear_model(op="Gemm", trans_b=True, bias="1n", true_rank=3)
    compressed = _compressed(model, 3)
    assert [i for i in compressed.graph.input] == [i for i in model.graph.input]
    assert [o for o in compressed.graph.output] == [o for o in model.graph.output]
    assert compressed.opset_import == model.opset_import
    # the dense W is gone; the (1, n) bias was reshaped into a new (n,) initializer, so C is gone too
    assert "W" not in initializer_names(compressed) and "C" not in initializer_names(compressed)
    assert len(compressed.graph.initializer) == 3


def test_bias_of_shape_n_is_reused_not_copied() -> None:
    compressed = _compressed(make_linear_model(op="Gemm", true_rank=3), 3)
    assert "C" in initializer_names(compressed) and len(compressed.graph.initializer) == 3


def test_constant_node_weight_is_removed() -> None:
    compressed = _compressed(make_linear_model(op="MatMul", weight_as_constant_node=True, true_rank=2), 2)
    assert "Constant" not in [n.op_type for n in compressed.graph.node]


def test_shared_weight_is_factored_once() -> None:
    model = make_linear_model(op="MatMul", x_shape=("batch", 32), true_rank=4)
    model.graph.node.append(onnx.helper.make_node("MatMul", ["X", "W"], ["Y2"], name="dense2"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("Y2", onnx.TensorProto.FLOAT, ["batch", 24]))
    compressed, report = compress(model, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
    assert report.factored == 2 and report.dense_params_before == 32 * 24
    assert len(compressed.graph.initializer) == 2  # one A and one B for both nodes
    feed = _feed(model)
    for expected, actual in zip(run(model, feed), run(compressed, feed), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_tau_one_reproduces_the_original_mlp() -> None:
    """tau = 1.0 keeps every singular value; forcing every layer to be factored must change nothing."""
    model = make_mlp()
    compressed, report = compress(model, policy=EnergyPolicy(1.0), max_rank_fraction=1e9, min_params=0, check=False,
                                  factor_heads=True)
    assert report.factored == 3 and all(d.rank == d.full_rank for d in report.layers)
    feed = {"X": np.random.default_rng(0).standard_normal((64, 48)).astype(np.float32)}
    (expected,), (actual,) = run(model, feed), run(compressed, feed)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_in_memory_model_is_not_modified() -> None:
    model = make_mlp()
    before = model.SerializeToString()
    compress(model, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
    assert model.SerializeToString() == before


def test_lp_method_at_p_two_matches_svd_and_reproduces_low_rank() -> None:
    model = make_linear_model(op="Gemm", trans_b=True, true_rank=4)
    feed = _feed(model)
    outputs = {}
    for method, power in (("svd", 1.0), ("lp", 2.0), ("lp", 1.0)):
        compressed, report = compress(model, policy=FixedRankPolicy(4), min_params=0, method=method, lp_power=power,
                                      check=False, factor_heads=True)
        onnx.checker.check_model(compressed, full_check=True)
        outputs[(method, power)] = run(compressed, feed)[0]
    (expected,) = run(model, feed)
    for actual in outputs.values():  # an exactly rank-4 weight: every method reproduces it
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_allclose(outputs[("lp", 2.0)], outputs[("svd", 1.0)], rtol=1e-5, atol=1e-5)


def test_gemm_bias_with_beta_zero_is_dropped_with_the_node() -> None:
    """beta = 0 ignores C: once the Gemm is factored, nothing uses C and it must not stay in the file."""
    model = make_linear_model(64, 48, op="Gemm", beta=0.0)
    compressed, report = compress(model, policy=FixedRankPolicy(8), min_params=0, check=False, factor_heads=True)
    assert report.factored == 1
    assert initializer_names(compressed) == {"W.arsvd_a", "W.arsvd_b"}


def test_the_rewrite_is_an_onnx_ir_pass_that_keeps_the_interface() -> None:
    """It composes with onnx_ir's passes, and a rewrite that touched the interface would be refused."""
    model = ir.from_proto(make_mlp())
    plans = plan_model(model, Settings(FixedRankPolicy(4), min_params=0), with_factors=True).plans
    result = ir.passes.Sequential(FactorLayersPass(plans), onnx_ir.passes.common.RemoveUnusedNodesPass())(model)
    assert result.modified and {n.op_type for n in result.model.graph} == {"MatMul", "Add", "Relu"}

    class RenamesAnOutput(FactorLayersPass):
        def call(self, model: ir.Model) -> ir.passes.PassResult:
            model.graph.outputs[0].name = "renamed"
            return ir.passes.PassResult(model, modified=True)

    with pytest.raises(ir.passes.PostconditionError, match="inputs or outputs"):
        RenamesAnOutput([])(ir.from_proto(make_mlp()))
