"""Finding factorable layers; every skip is asserted by its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import compress, inspect_model
from onnx_arsvd.cli.main import main
from onnx_arsvd.errors import UnsupportedModelError
from onnx_arsvd.graph.layers import Skipped, filter_layers, find_layers
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


def test_gemm_trans_a_is_a_layer_with_transposed_activation() -> None:
    model = make_linear_model(op="Gemm", x_shape=(32, "batch"))
    model.graph.node[0].attribute.append(helper.make_attribute("transA", 1))
    (layer,), skipped = _find(model)
    assert skipped == [] and layer.trans_x and not layer.left and layer.shape == (32, 24)


def test_integer_weight_is_skipped_with_dtype() -> None:
    model = make_linear_model(op="MatMul")
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.ones((32, 24), np.int32), "W"))
    layers, skipped = _find(model)
    assert layers == [] and skipped[0].reason == "weight has dtype INT32; only float weights can be factored"


def test_constant_first_operand_is_a_left_layer() -> None:
    model = make_linear_model(op="MatMul")
    model.graph.node[0].input[:] = ["W", "X"]
    (layer,), skipped = _find(model)
    # W @ X with W (32 x 24): the effective X-side matrix is W^T, 24 inputs -> 32 outputs
    assert skipped == [] and layer.left and layer.transposed and layer.shape == (24, 32)


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
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers, skipped = _find(model)
    assert layers == [] and "DequantizeLinear (quantized model)" in skipped[0].reason
    model.graph.node.insert(1, helper.make_node("Identity", ["W"], ["W_id"]))  # also behind a chain
    model.graph.node[2].input[1] = "W_id"
    layers, skipped = _find(model)
    assert layers == [] and "DequantizeLinear (quantized model)" in skipped[0].reason


def test_activation_times_activation_is_listed_with_reason() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "Z"], ["Y"], name="scores")], "mm",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 4])],
    )
    layers, skipped = _find(helper.make_model(graph))
    assert layers == [] and [s.reason for s in skipped] == [
        "neither operand is a constant (activation x activation, e.g. attention scores)"]


def test_weight_that_is_a_graph_input_is_left_alone_from_ir4() -> None:
    model = make_linear_model(op="MatMul")
    model.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, 24]))
    layers, skipped = _find(model)
    assert layers == []
    assert skipped[0].reason == "weight is also a graph input, so a user may feed another value; left as it is"
    # IR 3 requires every initializer to be an input: those weights stay factorable
    assert len(_find(make_linear_model(op="MatMul", opset=7, ir_version=3))[0]) == 1


def test_quantized_matmul_is_listed() -> None:
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["Xq", "Wq"], ["Y"], name="qmm")], "q",
        [helper.make_tensor_value_info("Xq", TensorProto.UINT8, [1, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 4])],
        initializer=[numpy_helper.from_array(np.ones((8, 4), np.int8), "Wq")],
    )
    layers, skipped = _find(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert layers == [] and skipped == [Skipped("qmm", "MatMulInteger", "quantized layer (MatMulInteger); factor the "
                                                "float model before quantizing")]


def test_subgraph_layers_are_found_with_their_scope() -> None:
    inner = make_linear_model(op="MatMul", x_shape=(1, 32)).graph
    body = helper.make_graph(list(inner.node), "then_body", [],
                             [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 24])])
    outer = helper.make_graph(
        [helper.make_node("If", ["cond"], ["Y"], name="branch", then_branch=body, else_branch=body)],
        "outer",
        [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
         helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 24])],
        initializer=list(inner.initializer),
    )
    layers, skipped = _find(helper.make_model(outer))
    assert skipped == []
    assert {layer.name for layer in layers} == {"branch.then_branch::dense", "branch.else_branch::dense"}
    # the weight is captured from the main graph: both branches share one key, so one factorization
    assert {layer.weight_key for layer in layers} == {("W", False)} and all(layer.in_subgraph for layer in layers)


def test_shared_weight_gives_one_key() -> None:
    model = make_linear_model(op="MatMul", x_shape=("batch", 32))
    model.graph.node.append(helper.make_node("MatMul", ["X", "W"], ["Y2"], name="dense2"))
    model.graph.output.append(helper.make_tensor_value_info("Y2", TensorProto.FLOAT, ["batch", 24]))
    layers, _ = _find(model)
    assert len(layers) == 2 and layers[0].weight_key == layers[1].weight_key


def test_include_and_exclude_patterns() -> None:
    layers, _ = _find(make_linear_model(op="MatMul"))
    kept, excluded = filter_layers(layers, include=["nothing*"])
    assert kept == [] and excluded == [(layers[0], "not matched by `include`")]
    kept, excluded = filter_layers(layers, exclude=["dens*"])
    assert kept == [] and excluded == [(layers[0], "matched by `exclude`")]
    kept, _ = filter_layers(layers, include=["W"])  # weight names match too
    assert len(kept) == 1


def _int8_model(layers: int = 5) -> onnx.ModelProto:
    """What quantize_dynamic leaves: MatMulInteger on int8 weights, plus one activation x activation MatMul."""
    nodes = [helper.make_node("MatMulInteger", ["Xq", "Wq"], [f"Y{i}"], name=f"qmm{i}") for i in range(layers)]
    nodes += [helper.make_node("Cast", ["Y0"], ["Yf"], to=TensorProto.FLOAT),
              helper.make_node("MatMul", ["Yf", "Z"], ["scores"], name="scores")]
    graph = helper.make_graph(
        nodes, "int8",
        [helper.make_tensor_value_info("Xq", TensorProto.UINT8, [1, 8]),
         helper.make_tensor_value_info("Z", TensorProto.FLOAT, [4, 2])],
        [helper.make_tensor_value_info(f"Y{i}", TensorProto.INT32, [1, 4]) for i in range(layers)]
        + [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 2])],
        initializer=[numpy_helper.from_array(np.ones((8, 4), np.int8), "Wq")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_no_layer_error_lists_every_reason() -> None:
    with pytest.raises(UnsupportedModelError) as error:
        compress(_int8_model(), check=False, factor_heads=True)
    assert str(error.value) == (
        "no factorable layer (MatMul/Gemm/Gather with a 2-D float constant weight); passed over: "
        "MatMulInteger: quantized layer (MatMulInteger); factor the float model before quantizing "
        "('qmm0', 'qmm1', 'qmm2' and 2 more); "
        "MatMul: neither operand is a constant (activation x activation, e.g. attention scores) ('scores')")


def test_matmul_inside_a_model_local_function_is_listed() -> None:
    function = helper.make_function("local", "dense_fn", ["x", "w"], ["y"],
                                    [helper.make_node("MatMul", ["x", "w"], ["y"], name="fn_matmul")],
                                    [helper.make_opsetid("", 17)])
    graph = helper.make_graph(
        [helper.make_node("dense_fn", ["X", "W"], ["Y"], domain="local", name="call")], "calls",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 24])],
        initializer=[numpy_helper.from_array(np.ones((32, 24), np.float32), "W")],
    )
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    layers, skipped = _find(model)
    assert layers == [] and skipped == [Skipped("fn_matmul", "MatMul", "inside model-local function 'dense_fn'; "
                                                "functions are not rewritten (inline them first, e.g. with "
                                                "onnx_ir.passes.common.InlinePass)")]


def test_weight_reshaped_to_three_dimensions_is_listed() -> None:
    model = make_linear_model(op="MatMul")
    model.graph.initializer.append(numpy_helper.from_array(np.array([2, 16, 24], np.int64), "shape3"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["W", "shape3"], ["W3"]))
    model.graph.node[1].input[1] = "W3"
    layers, skipped = _find(model)
    assert layers == [] and [s.reason for s in skipped] == [
        "weight has 3 dimensions after its Transpose/Cast/Reshape/Identity chain; only 2-D weights are factored"]


def test_inspect_lists_what_an_int8_model_passes_over(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "int8.onnx"
    onnx.save(_int8_model(), path)
    report = inspect_model(path, factor_heads=True)
    assert (report.layers == []
            and [s.name for s in report.skipped] == ["qmm0", "qmm1", "qmm2", "qmm3", "qmm4", "scores"])
    assert main(["inspect", str(path), "-q"]) == 0
    out = capsys.readouterr().out
    assert "not factored:" in out and out.count("quantized layer (MatMulInteger)") == 5
