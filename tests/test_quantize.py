"""Quantization with onnxruntime's quantizers: the shipped Fashion MLP and small built models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.methods.quantize.configs import Int4WeightOnly, cpu_has_vnni, quantization
from onnx_arsvd.methods.quantize.quantizers import _gemm_as_matmul
from tests.conftest import MODELS, make_linear_model, run


def test_vnni_is_read_from_the_cpu_flags(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512bw\n")
    assert not cpu_has_vnni(path)
    path.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\n")
    assert cpu_has_vnni(path)
    assert not cpu_has_vnni(tmp_path / "missing")


def _fashion(samples: int = 2000) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    with np.load(MODELS / "fashion_test.npz") as archive:
        feed, labels = {"input": archive["input"][:samples]}, archive["labels"][:samples]
    model = onnx.load(MODELS / "fashion_mlp.onnx")
    return model, feed, labels, run(model, feed)[0]


def test_int4_tables_on_a_model_without_tables_is_int8_alone() -> None:
    model = onnx.load(MODELS / "fashion_mlp.onnx")
    mixed, int8 = quantization("int8+int4-tables").apply(model), quantization("int8").apply(model)
    assert mixed.opset_import == int8.opset_import and mixed.ir_version == int8.ir_version == model.ir_version
    assert [n.op_type for n in mixed.graph.node] == [n.op_type for n in int8.graph.node]


@pytest.mark.parametrize(("mode", "max_size", "max_drop"), [("int8", 0.27, 1.0), ("int4", 0.17, 2.0)])
def test_quantized_fashion_mlp_runs_is_smaller_and_close(mode: str, max_size: float, max_drop: float) -> None:
    """INT8: 1 byte per weight plus per-channel scales (0.25x the float file at best); INT4: half a byte
    plus one scale per 32 weights (~0.16x). Accuracy on 2,000 test images within the noise of a
    weight quantization (benchmarks/results/quantization.md: INT8 changed Fashion accuracy by 0.06 points)."""
    model, feed, labels, logits = _fashion()
    quantized = quantization(mode).apply(model)
    ops = {node.op_type for node in quantized.graph.node}
    assert ("MatMulNBits" if mode == "int4" else "MatMulInteger") in ops
    assert quantized.ByteSize() < max_size * model.ByteSize()
    output = run(quantized, feed)[0]
    drop = 100 * (np.mean(logits.argmax(1) == labels) - np.mean(output.argmax(1) == labels))
    assert drop <= max_drop
    cosine = np.sum(output * logits, 1) / np.linalg.norm(output, axis=1) / np.linalg.norm(logits, axis=1)
    assert cosine.mean() > 0.99
    assert model.graph.node[0].op_type != "MatMulNBits" and len(model.graph.initializer) == 6  # input untouched


@pytest.mark.parametrize("kwargs", [
    {"trans_b": True, "alpha": 0.5, "beta": 2.0},
    {"trans_b": False, "bias": "scalar"},
    {"trans_b": True, "bias": None},
    {"bias": "1n", "dtype": np.float16},
])
def test_gemm_becomes_an_equal_matmul_for_int4(kwargs: dict) -> None:
    proto = make_linear_model(32, 24, op="Gemm", **kwargs)
    model = ir.from_proto(proto)
    assert _gemm_as_matmul(model) == 1
    converted = ir.to_proto(model)
    onnx.checker.check_model(converted, full_check=True)
    assert [n.op_type for n in converted.graph.node] == ["MatMul"] + (["Add"] if kwargs.get("bias", "n") else [])
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(kwargs.get("dtype", np.float32))
    tolerance = 2e-3 if kwargs.get("dtype") is np.float16 else 1e-5  # float16 rounds the folded alpha*W
    assert np.allclose(run(converted, {"X": x})[0], run(proto, {"X": x})[0], rtol=tolerance, atol=tolerance)


def test_bad_settings_are_our_errors() -> None:
    with pytest.raises(InvalidInputError, match="unknown quantization 'int3'"):
        quantization("int3")
    with pytest.raises(InvalidInputError, match="block size"):
        Int4WeightOnly(block_size=24)


def test_int8_leaves_convolutions_float() -> None:
    """Dynamic ConvInteger wrecked the PP-OCRv6 recogniser (benchmarks/results/ppocr.md): only the rest is quantized."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["X", "K"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Flatten", ["c"], ["f"]),
         helper.make_node("MatMul", ["f", "W"], ["Y"])],
        "conv_then_dense",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 16])],
        initializer=[numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "K"),
                     numpy_helper.from_array(rng.standard_normal((256, 16)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ops = {node.op_type for node in quantization("int8").apply(model).graph.node}
    assert "Conv" in ops and "ConvInteger" not in ops and "MatMulInteger" in ops


def test_int4_tables_with_int8_layers_is_smaller_than_int8_and_close() -> None:
    """Embedding tables 4-bit (GatherBlockQuantized), the dense layer int8: smaller than int8 alone, and each
    looked-up row within one 4-bit step of the original's: steps are max|block|/8 over [-8, 7], so a block's
    positive maximum is clipped by a whole step (measured: 0.125 of the block maximum at worst)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((2000, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["E"], name="embed"),
         helper.make_node("MatMul", ["E", "W"], ["Y"], name="dense")],
        "embed_then_dense",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 5, 48]),
         helper.make_tensor_value_info("E", TensorProto.FLOAT, ["batch", 5, 64])],
        initializer=[numpy_helper.from_array(table, "table"),
                     numpy_helper.from_array(rng.standard_normal((64, 48)).astype(np.float32) / 8, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    mixed, int8 = quantization("int8+int4-tables").apply(model), quantization("int8").apply(model)
    ops = {node.op_type for node in mixed.graph.node}
    assert "GatherBlockQuantized" in ops and "MatMulInteger" in ops and "Gather" not in ops
    assert mixed.ByteSize() < 0.7 * int8.ByteSize()  # the table: 0.5 + 4/32 bytes per value (scales) instead of 1
    ids = {"ids": rng.integers(0, 2000, (8, 5))}
    y, rows = run(mixed, ids)
    blocks = np.abs(table[ids["ids"]].reshape(8, 5, 2, 32)).max(axis=-1, keepdims=True)
    assert np.all(np.abs(rows - table[ids["ids"]]).reshape(8, 5, 2, 32) <= blocks / 8 * 1.001 + 1e-6)
    expected = run(model, ids)[0]
    cosine = np.sum(y * expected, -1) / np.linalg.norm(y, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosine.mean() > 0.99
    assert [node.op_type for node in model.graph.node] == ["Gather", "MatMul"]  # the input is untouched
    assert "int8 dynamic" in quantization("int8+int4-tables").describe() and "tables int4" in \
        quantization("int8+int4-tables").describe()


@pytest.mark.parametrize("mode", ["int8", "int4", "int8+int4-tables"])
def test_quantizing_leaves_a_bare_root_logger_bare(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime's quantizers call basicConfig (at import, and through logging.warning on a bare root logger,
    as the CLI's is): a root handler left behind printed every later warning of this tool twice."""
    import logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # as in the CLI: pytest's own capture handlers would hide it
    quantization(mode).apply(onnx.load(MODELS / "fashion_mlp.onnx"))
    assert root.handlers == []


def test_the_report_says_the_model_was_quantized() -> None:
    from onnx_arsvd import compress, format_report

    _, report = compress(make_linear_model(64, 48, op="MatMul", x_shape=("batch", 64)), quantize="int8", samples=2)
    assert "note: quantized with onnxruntime: int8 dynamic (per-channel" in format_report(report)
    tagged = make_linear_model(64, 48, op="MatMul", x_shape=("batch", 64))
    onnx.helper.set_model_props(tagged, {"onnx_arsvd.quantize": "int8 dynamic (per-channel)"})  # an earlier output
    _, plain = compress(tagged, samples=2)
    assert "quantized" not in format_report(plain)
