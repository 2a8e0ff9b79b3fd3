"""Finding factorable layers; every skip is asserted by its reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd.candidates import filter_layers, find_layers
from tests.conftest import make_linear_model


def _find(model: onnx.ModelProto):
    return find_layers(ir.from_proto(model))


@pytest.mark.parametrize(
    ("kwargs", "shape", "transposed", "has_bias"),
    [
        ({"op": "MatMul"}, (32, 24), False, False),
        ({"op": "Gemm", "trans_b": True}, (32, 24), True, True),
        ({"op": "Gemm", "bias": "1n", "alpha": 0.5, "beta": 2.0}, (32, 24), False, True),
        ({"op": "Gemm", "bias": "scalar"}, (32, 24), False, True),
        ({"op": "Gemm", "bias": None}, (32, 24), False, False),
        ({"op": "Gemm", "beta": 0.0}, (32, 24), False, False),
        ({"op": "MatMul", "weight_as_constant_node": True}, (32, 24), False, False),
        ({"op": "MatMul", "dtype": np.float16}, (32, 24), False, False),
    ],
)
def test_dense_forms_are_found(kwargs: dict, shape: tuple[int, int], transposed: bool, has_bias: bool) -> None:
    layers, skipped = _find(make_linear_model(**kwargs))
    assert skipped == []
    (layer,) = layers
    assert layer.shape == shape and layer.transposed is transposed and (layer.bias is not None) is has_bias


def test_gemm_with_batch_varying_bias_is_skipped() -> None:
    layers, skipped = _find(make_linear_model(op="Gemm", bias="bn"))
    assert layers == []
    assert "bias C of shape (4, 24) varies along the batch rows" in skipped[0].reason


def test_gemm_trans_a_is_skipped() -> None:
    model = make_linear_model(op="Gemm")
    model.graph.node[0].attribute.append(helper.make_attribute("transA", 1))
    layers, skipped = _find(model)
    assert layers == [] and skipped[0].reason == "transA=1 (activation transposed) is not supported"


def test_integer_weight_is_skipped_with_dtype() -> None:
    model = make_linear_model(op="MatMul")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((32, 24), np.int32), "W"))
    layers, skipped = _find(model)
    assert layers == [] and skipped[0].reason == "weight has dtype INT32; only float weights can be factored"


def test_constant_first_operand_is_skipped() -> None:
    model = make_linear_model(op="MatMul")
    node = model.graph.node[0]
    node.input[:] = ["W", "X"]
    layers, skipped = _find(model)
    assert layers == [] and "constant is the first operand" in skipped[0].reason


def test_dequantized_weight_is_skipped() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W"]),
            helper.make_node("MatMul", ["X", "W"], ["Y"], name="qdense"),
        ],
        "qdq",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.ones((8, 4), np.int8), "Wq"),
                     numpy_helper.from_array(np.array(0.1, np.float32), "scale")],
    )
    layers, skipped = _find(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert layers == [] and "DequantizeLinear (quantized model)" in skipped[0].reason


def test_activation_times_activation_is_not_a_layer() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Z"], ["Y"])], "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
    )
    assert _find(helper.make_model(graph)) == ([], [])


def test_subgraph_layers_are_listed_as_skipped() -> None:
    inner = make_linear_model(op="MatMul", x_shape=(1, 32)).graph
    body = helper.make_graph(list(inner.node), "then_body", [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 24])])
    outer = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=body, else_branch=body)],
        "outer",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 24])],
        initializer=list(inner.initializer),
    )
    layers, skipped = _find(helper.make_model(outer))
    assert layers == []
    assert {s.reason for s in skipped} == {
        "inside the 'then_branch' subgraph of If node 'branch'; subgraphs are not rewritten",
        "inside the 'else_branch' subgraph of If node 'branch'; subgraphs are not rewritten",
    }


def test_shared_weight_gives_one_key() -> None:
    model = make_linear_model(op="MatMul", x_shape=("batch", 32))
    model.graph.node.append(helper.make_node("MatMul", ["X", "W"], ["Y2"], name="dense2"))
    model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, ["batch", 24]))
    layers, _ = _find(model)
    assert len(layers) == 2 and layers[0].weight_key == layers[1].weight_key


def test_include_and_exclude_patterns() -> None:
    layers, _ = _find(make_linear_model(op="MatMul"))
    kept, excluded = filter_layers(layers, include=["nothing*"])
    assert kept == [] and excluded == [(layers[0], "not matched by --include")]
    kept, excluded = filter_layers(layers, exclude=["dens*"])
    assert kept == [] and excluded == [(layers[0], "matched by --exclude")]
    kept, _ = filter_layers(layers, include=["W"])  # weight names match too
    assert len(kept) == 1
