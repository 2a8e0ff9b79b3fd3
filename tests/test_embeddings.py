"""Embedding tables: Gather(W, ids) found, left dense by default, and rewritten as Gather(A, ids) @ B."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnx_arsvd import FixedRankPolicy, compress, inspect_model
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.numerics.factorize import factors_at_rank, lp_factors, spectrum
from tests.conftest import make_embedding_model, make_mlp, run


def test_lookup_is_found_and_other_gathers_are_not() -> None:
    (layer,), skipped = find_layers(ir.from_proto(make_embedding_model(50, 16)))
    assert layer.is_embedding and layer.shape == (50, 16) and skipped == []
    _, skipped = find_layers(ir.from_proto(make_embedding_model(50, 16, axis=1, ids_shape=("n",))))
    assert [s.reason for s in skipped] == ["Gather along axis 1 selects columns, not embedding rows"]
    # Gather on a shape (1-D integers) is arithmetic, not a lookup: not even listed
    model = make_mlp()
    model.graph.node.extend([onnx.helper.make_node("Shape", ["X"], ["s"]),
                             onnx.helper.make_node("Gather", ["s", "zero"], ["b"], axis=0)])
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(0, np.int64), "zero"))
    layers, skipped = find_layers(ir.from_proto(model))
    assert all(not layer.is_embedding for layer in layers) and skipped == []


def test_tables_stay_dense_without_an_embedding_policy() -> None:
    report = inspect_model(make_embedding_model(50, 16), min_params=0, factor_heads=True)
    (decision,) = report.layers
    assert not decision.factored and decision.reason == "embedding table: factored only with an `embedding_policy`"


@pytest.mark.parametrize("ids_shape", [("batch", "seq"), ("batch",), ()], ids=["b-s", "b", "scalar"])
def test_low_rank_table_is_reproduced_for_any_ids_shape(ids_shape: tuple) -> None:
    model = make_embedding_model(60, 24, true_rank=5, ids_shape=ids_shape)
    compressed, report = compress(model, embedding_policy=FixedRankPolicy(5), min_params=0, check=False,
                                  factor_heads=True)
    assert report.factored == 1
    onnx.checker.check_model(compressed, full_check=True)
    assert [n.op_type for n in compressed.graph.node] == ["Gather", "MatMul"]
    assert "table" not in {t.name for t in compressed.graph.initializer}
    dims = {"batch": 3, "seq": 7}
    ids = np.random.default_rng(0).integers(0, 60, [dims[d] for d in ids_shape]).astype(np.int64)
    (expected,), (actual,) = run(model, {"ids": ids}), run(compressed, {"ids": ids})
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_lp_method_writes_the_lp_factors_into_the_graph() -> None:
    """200 token vectors near a 3-D subspace and 8 far-away ones: the l_1 and SVD rank-3 tables differ, and the
    compressed model looks up the l_p fit at the power asked for (p = 2 is the SVD)."""
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((20, 3)))[0]
    inliers = rng.standard_normal((200, 3)) @ basis.T + 0.01 * rng.standard_normal((200, 20))
    table = np.vstack([inliers, 5.0 * rng.standard_normal((8, 20))]).astype(np.float32)
    model = make_embedding_model(208, 20, ids_shape=("n",))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(table, "table"))
    ids = {"ids": np.arange(208, dtype=np.int64)}  # every row: the output is the table the model now holds
    svd = np.matmul(*factors_at_rank(spectrum(table), 3))
    for power in (1.0, 2.0):
        compressed, report = compress(model, embedding_policy=FixedRankPolicy(3), min_params=0, method="lp",
                                      lp_power=power, check=False, factor_heads=True)
        assert report.factored == 1
        (looked_up,) = run(compressed, ids)
        fit = lp_factors(table, 3, power)
        np.testing.assert_allclose(looked_up, fit.a @ fit.b, rtol=0, atol=1e-5 * np.abs(table).max())
        if power == 1.0:  # the inliers are fitted far better than by the SVD, which the outliers pull away
            assert np.linalg.norm(looked_up - svd) > 0.1 * np.linalg.norm(svd)
            assert np.linalg.norm((looked_up - table)[:200]) < 0.5 * np.linalg.norm((svd - table)[:200])
        else:
            np.testing.assert_allclose(looked_up, svd, rtol=0, atol=1e-5 * np.abs(table).max())
