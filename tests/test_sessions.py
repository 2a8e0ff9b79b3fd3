"""Sessions on in-memory models: the weights reach onnxruntime as arrays, never serialized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd.model_io import to_model
from onnx_arsvd.sessions import IN_MEMORY_MIN_BYTES, make_session, model_session
from tests.conftest import MODELS, make_mlp


@pytest.mark.parametrize("external", [False, True])
def test_model_session_gives_the_serialized_models_outputs_and_leaves_the_model_unchanged(
        tmp_path: Path, external: bool) -> None:
    """Inline weights and memory-mapped external data alike; the size is the serialized size to within
    the external-data references (a few dozen bytes per weight)."""
    proto = make_mlp((64, 48, 32, 10))
    if external:
        onnx.save_model(proto, tmp_path / "mlp.onnx", save_as_external_data=True, location="mlp.data",
                        size_threshold=0)
        model = to_model(tmp_path / "mlp.onnx")
    else:
        model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    session, size = model_session(model)
    assert ir.to_proto(model).SerializeToString() == before
    feed = {"X": np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)}
    expected = make_session(tmp_path / "mlp.onnx" if external else before).run(None, feed)
    np.testing.assert_array_equal(session.run(None, feed)[0], expected[0])
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    assert weights <= size <= weights + 4096


@pytest.mark.parametrize("external", [False, True])
def test_small_and_bfloat16_weights_stay_inline(tmp_path: Path, external: bool) -> None:
    """Only the types onnxruntime takes from numpy go as arrays; a bfloat16 constant and small tensors stay in
    the proto (read in from external data), and the model still runs."""
    big = np.arange(2 * IN_MEMORY_MIN_BYTES, dtype=np.float32).reshape(-1, 8) / 1e4
    half = numpy_helper.from_array(np.ones((8, 8), dtype=np.float32), "half_f32")
    bf16 = helper.make_tensor("half", TensorProto.BFLOAT16, [8, 8], [1.0] * 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Cast", ["half"], ["c"], to=1),
         helper.make_node("MatMul", ["h", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, big.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(big, "W"), bf16, half])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if external:
        onnx.save_model(proto, tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    session, size = model_session(to_model(tmp_path / "m.onnx") if external else ir.from_proto(proto))
    x = np.ones((2, big.shape[0]), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ big @ np.ones((8, 8)), rtol=1e-6)
    assert size >= big.nbytes + 64 * 2


def test_the_shipped_mlp_runs_the_same_from_arrays() -> None:
    model = to_model(MODELS / "fashion_mlp.onnx")
    session, _ = model_session(model)
    x = np.random.default_rng(1).integers(0, 255, (4, 784)).astype(np.uint8)
    expected = make_session(MODELS / "fashion_mlp.onnx").run(None, {"input": x})[0]
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected)
