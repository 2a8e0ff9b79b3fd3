"""Every node passed over carries its reason, and the rewrite steps around names already taken.

Each skip case is a real model with one factorable layer ("dense") beside the node to be passed over:
the reason is asserted by its text, and the compressed model, with that node untouched, must give the
original's outputs in onnxruntime.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import FixedRankPolicy, compress
from onnx_arsvd.graph.layers import find_layers
from tests.conftest import initializer_names, make_linear_model, random_weight, run

Case = tuple[onnx.ModelProto, dict[str, np.ndarray], tuple[str, str, str]]


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: dict[str, list[int]],
           initializers: list[onnx.TensorProto], feed: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict]:
    """X (2 x 8) -> "dense" MatMul by an exactly rank-2 weight -> D, beside ``nodes``; float ``outputs`` by shape."""
    dense_weight = numpy_helper.from_array(random_weight(8, 6, true_rank=2).astype(np.float32), "Wd")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Wd"], ["D"], name="dense"), *nodes], "skips",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 8]), *inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in {"D": [2, 6], **outputs}.items()],
        initializer=[dense_weight, *initializers],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feed = {"X": np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32), **feed}
    return model, feed


def _float(name: str, *shape: int, seed: int = 2) -> onnx.TensorProto:
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _gemm_by_activation() -> Case:
    model = _model([helper.make_node("Gemm", ["X", "B"], ["G"], name="gemm")],
                   [helper.make_tensor_value_info("B", TensorProto.FLOAT, [8, 4])], {"G": [2, 4]}, [],
                   {"B": np.ones((8, 4), np.float32)})
    return *model, ("gemm", "Gemm", "neither A nor B is a constant")


def _gemm_by_dequantized_weight() -> Case:
    model = _model([helper.make_node("DequantizeLinear", ["Wq", "scale"], ["Wdq"]),
                    helper.make_node("Gemm", ["X", "Wdq"], ["G"], name="qgemm")],
                   [], {"G": [2, 4]},
                   [numpy_helper.from_array(np.arange(32, dtype=np.int8).reshape(8, 4), "Wq"),
                    numpy_helper.from_array(np.array(0.1, np.float32), "scale")], {})
    return *model, ("qgemm", "Gemm", "weight comes from DequantizeLinear (quantized model); factor before quantizing")


def _three_dimensional_weight() -> Case:
    model = _model([helper.make_node("MatMul", ["X", "W3"], ["M"], name="batched")], [], {"M": [3, 2, 4]},
                   [_float("W3", 3, 8, 4)], {})
    return *model, ("batched", "MatMul", "weight has 3 dimensions; only 2-D weights are factored")


def _weight_is_an_output() -> Case:
    model = _model([helper.make_node("MatMul", ["X", "Wo"], ["M"], name="exposed")], [], {"M": [2, 4], "Wo": [8, 4]},
                   [_float("Wo", 8, 4)], {})
    return *model, ("exposed", "MatMul", "weight is also a graph output")


def _gemm_bias_is_an_input() -> Case:
    model = _model([helper.make_node("Gemm", ["X", "Wc", "C"], ["G"], name="fed_bias")],
                   [helper.make_tensor_value_info("C", TensorProto.FLOAT, [4])], {"G": [2, 4]}, [_float("Wc", 8, 4)],
                   {"C": np.arange(4, dtype=np.float32)})
    return *model, ("fed_bias", "Gemm", "bias C is not a constant")


def _table_is_an_output() -> Case:
    model = _model([helper.make_node("Gather", ["T", "ids"], ["E"], name="lookup")],
                   [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])], {"E": [3, 4], "T": [10, 4]},
                   [_float("T", 10, 4)],
                   {"ids": np.array([0, 9, 4], np.int64)})
    return *model, ("lookup", "Gather", "table is also a graph output")


@pytest.mark.parametrize("case", [_gemm_by_activation, _gemm_by_dequantized_weight, _three_dimensional_weight,
                                  _weight_is_an_output, _gemm_bias_is_an_input, _table_is_an_output],
                         ids=lambda case: case.__name__.strip("_"))
def test_node_is_passed_over_with_its_reason(case: Callable[[], Case]) -> None:
    model, feed, (name, op_type, reason) = case()
    layers, skipped = find_layers(ir.from_proto(model))
    assert [layer.name for layer in layers] == ["dense"]
    assert [(s.name, s.op_type, s.reason) for s in skipped] == [(name, op_type, reason)]
    compressed, report = compress(model, policy=FixedRankPolicy(2), min_params=0,
                                  embedding_policy=FixedRankPolicy(2), check=False, factor_heads=True)
    assert report.factored == 1 and [s.reason for s in report.skipped] == [reason]
    onnx.checker.check_model(compressed, full_check=True)
    kept = [n for n in compressed.graph.node if n.name == name]
    original = [n for n in model.graph.node if n.name == name]
    assert kept == original  # the node passed over is exactly as it was
    for expected, actual in zip(run(model, feed), run(compressed, feed), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-5 * max(1.0, float(np.abs(expected).max())))


def test_new_names_step_around_names_already_taken() -> None:
    """The factors would be named W.arsvd_a / W.arsvd_b and the new nodes dense/arsvd_a ...: all are taken here."""
    model = make_linear_model(op="MatMul", x_shape=("batch", 32), true_rank=4)
    taken_b = random_weight(24, 5, seed=7).astype(np.float32)  # an unrelated initializer already named W.arsvd_b
    model.graph.initializer.append(numpy_helper.from_array(taken_b, "W.arsvd_b"))
    model.graph.node.extend([
        helper.make_node("Relu", ["X"], ["W.arsvd_a"], name="dense/arsvd_a"),
        helper.make_node("Neg", ["W.arsvd_a"], ["W.arsvd_a_1"], name="dense/arsvd_b"),
        helper.make_node("Identity", ["W.arsvd_b"], ["taken_b"], name="dense/arsvd_bias"),
    ])
    model.graph.output.extend([helper.make_tensor_value_info("W.arsvd_a_1", TensorProto.FLOAT, ["batch", 32]),
                               helper.make_tensor_value_info("taken_b", TensorProto.FLOAT, [24, 5])])
    compressed, report = compress(model, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
    assert report.factored == 1
    onnx.checker.check_model(compressed, full_check=True)  # names are still unique
    assert initializer_names(compressed) == {"W.arsvd_b", "W.arsvd_a_2", "W.arsvd_b_1"}
    new_nodes = [n.name for n in compressed.graph.node if n.op_type == "MatMul"]
    assert new_nodes == ["dense/arsvd_a_1", "dense/arsvd_b_1"]
    feed = {"X": np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)}
    (y, negated, _), (y_new, negated_new, b_new) = run(model, feed), run(compressed, feed)
    np.testing.assert_allclose(y_new, y, rtol=0, atol=1e-5 * np.abs(y).max())
    np.testing.assert_array_equal(negated_new, negated)
    np.testing.assert_array_equal(b_new, taken_b)  # the existing W.arsvd_b is untouched by the factor's name
