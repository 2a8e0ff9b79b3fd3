"""Heads are found by what they do: a layer whose product reaches a graph output through elementwise, normalising and
shape ops that mix it only with itself and constants, in any spelling; a residual writer is no head."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import FixedRankPolicy, compress
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.methods.lowrank.model_plan import feeds_graph_output
from tests.conftest import random_weight

F = TensorProto.FLOAT


def _weights(*shapes: tuple[int, int]) -> list:
    return [numpy_helper.from_array(random_weight(m, n, seed=i).astype(np.float32), f"W{i}")
            for i, (m, n) in enumerate(shapes)]


def _spelled_softmax_classifier():  # type: ignore[no-untyped-def]
    """X -> dense(64x64) -> Relu -> head(64x32) + bias -> softmax written out as jax2tf does."""
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["h"], name="hidden"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W1"], ["z0"], name="head"),
        helper.make_node("Add", ["z0", "bias"], ["z"]),
        helper.make_node("ReduceMax", ["z"], ["m"], axes=[-1], keepdims=1),
        helper.make_node("Sub", ["z", "m"], ["s"]),
        helper.make_node("Exp", ["s"], ["e"]),
        helper.make_node("ReduceSum", ["e", "axis"], ["t"], keepdims=1),
        helper.make_node("Div", ["e", "t"], ["P"]),
    ]
    graph = helper.make_graph(nodes, "spelled", [helper.make_tensor_value_info("X", F, ["batch", 64])],
                              [helper.make_tensor_value_info("P", F, ["batch", 32])],
                              initializer=[*_weights((64, 64), (64, 32)),
                                           numpy_helper.from_array(np.zeros(32, np.float32), "bias"),
                                           numpy_helper.from_array(np.array([-1], np.int64), "axis")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _residual_block():  # type: ignore[no-untyped-def]
    """Y = LayerNorm(X + dense(X)): the dense layer writes to a residual stream, mixed with X before the output."""
    nodes = [
        helper.make_node("MatMul", ["X", "W0"], ["d"], name="writer"),
        helper.make_node("Add", ["X", "d"], ["sum"]),
        helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["Y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "residual", [helper.make_tensor_value_info("X", F, ["batch", 64])],
                              [helper.make_tensor_value_info("Y", F, ["batch", 64])],
                              initializer=[*_weights((64, 64)),
                                           numpy_helper.from_array(np.ones(64, np.float32), "gamma"),
                                           numpy_helper.from_array(np.zeros(64, np.float32), "beta")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("build", "heads"), [(_spelled_softmax_classifier, {"head"}), (_residual_block, set())])
def test_heads_are_found_by_what_they_do(build, heads: set[str]) -> None:  # type: ignore[no-untyped-def]
    model = ir.from_proto(build())
    assert {layer.name for layer in find_layers(model)[0] if feeds_graph_output(layer.node)} == heads


def test_a_spelled_out_softmax_head_stays_dense_without_data() -> None:
    """The jax2tf spelling used to hide the head: --ratio 0.5 without data factored it."""
    _, report = compress(_spelled_softmax_classifier(), policy=FixedRankPolicy(4), min_params=0, check=False)
    decisions = {d.name: d for d in report.layers}
    assert decisions["hidden"].factored and not decisions["head"].factored
    assert "feeds a graph output" in decisions["head"].reason
