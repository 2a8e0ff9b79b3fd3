"""Sessions on in-memory models: external data stays in its files, found from any working folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import EnergyPolicy, compress, verify
from onnx_arsvd.io.models import to_model
from onnx_arsvd.measure.sessions import make_session, model_session
from tests.conftest import MODELS, external_copy_elsewhere, make_mlp


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
def test_any_weight_type_and_any_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                external: bool) -> None:
    """A bfloat16 constant next to float weights, inline or in external data, from a working folder that is not
    the model's: onnxruntime is told the data's folder (given bytes, it would look in the working folder)."""
    big = np.arange(2048, dtype=np.float32).reshape(-1, 8) / 1e4
    bf16 = helper.make_tensor("half", TensorProto.BFLOAT16, [8, 8], [1.0] * 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Cast", ["half"], ["c"], to=1),
         helper.make_node("MatMul", ["h", "c"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, big.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(big, "W"), bf16])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    folder = tmp_path / "model"
    folder.mkdir()
    if external:
        onnx.save_model(proto, folder / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    session, size = model_session(to_model(folder / "m.onnx") if external else ir.from_proto(proto))
    x = np.ones((2, big.shape[0]), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ big @ np.ones((8, 8)), rtol=1e-6)
    assert big.nbytes + 64 * 2 <= size <= big.nbytes + 64 * 2 + 1024


def test_external_data_in_two_folders_is_read_in(tmp_path: Path) -> None:
    """Weights from two models' folders (one joined into the other): no single folder to name, so the
    external tensors are read into the serialized graph, and the model is left as it was."""
    first, second = tmp_path / "a", tmp_path / "b"
    for folder, seed in ((first, 0), (second, 1)):
        folder.mkdir()
        onnx.save_model(make_mlp((64, 48, 32, 10), seed=seed), folder / "mlp.onnx", save_as_external_data=True,
                        location="mlp.data", size_threshold=0)
    model, other = to_model(first / "mlp.onnx"), to_model(second / "mlp.onnx")
    model.graph.initializers["W1"].const_value = other.graph.initializers["W1"].const_value
    session, _ = model_session(model)
    assert all(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    feed = {"X": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)}
    weights = {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}
    hidden = np.maximum(feed["X"] @ weights["W0"] + weights["b0"], 0)
    hidden = np.maximum(hidden @ weights["W1"] + weights["b1"], 0)
    expected = hidden @ weights["W2"] + weights["b2"]
    np.testing.assert_allclose(session.run(None, feed)[0], expected, rtol=1e-4, atol=1e-5)


def test_the_shipped_mlp_runs_the_same_through_model_session() -> None:
    model = to_model(MODELS / "fashion_mlp.onnx")
    session, _ = model_session(model)
    x = np.random.default_rng(1).integers(0, 255, (4, 784)).astype(np.uint8)
    expected = make_session(MODELS / "fashion_mlp.onnx").run(None, {"input": x})[0]
    np.testing.assert_array_equal(session.run(None, {"input": x})[0], expected)


def test_in_memory_models_with_external_data_verify_from_any_working_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``compress`` without an output verifies the rewritten model in memory, whose untouched weights are still
    references into the input's data file: that file is found from another working folder, by any session."""
    copy, elsewhere = external_copy_elsewhere(MODELS / "fashion_mlp.onnx", tmp_path, monkeypatch)
    model, report = compress(copy, policy=EnergyPolicy(0.9), data=MODELS / "fashion_test.npz")
    assert report.verification.samples == 10000 and report.verification.accuracy_drop < 1.0
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    again = verify(to_model(copy), model, data=MODELS / "fashion_test.npz")
    assert again.accuracy_drop == report.verification.accuracy_drop
    assert list(elsewhere.iterdir()) == []
