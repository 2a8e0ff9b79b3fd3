"""Padded token positions (attention mask 0) are left out of the Grams, the comparisons and the responses."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import verify
from onnx_arsvd.cli.main import main
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.calibration import capture_grams
from onnx_arsvd.measure.sensitivity import layer_responses
from onnx_arsvd.methods.lowrank.curves import weight_curves
from onnx_arsvd.numerics.padding import drop_padding, real_positions, sequence_outputs, zero_padding
from onnx_arsvd.report.model_report import format_verification
from tests.conftest import random_weight

M, N, SEQ = 16, 12, 6


def _masked_model(weight: np.ndarray) -> onnx.ModelProto:
    """Y = X @ W + mask (as floats, per position): a layer on batch x sequence x M activations, as a transformer's."""
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["H"], name="dense"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axes"], ["mask3"]),
        helper.make_node("Add", ["H", "mask3"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "masked",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", M]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", N])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W"),
                     numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(samples: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Right-padded sequences of 1 .. SEQ tokens; the padded positions' inputs are large, unlike the tokens'."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, SEQ + 1, samples)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    x = rng.standard_normal((samples, SEQ, M)) * np.where(mask, 1.0, 30.0)[..., None]
    return {"X": x.astype(np.float32), "attention_mask": mask}


def test_real_positions_read_only_a_zero_one_mask() -> None:
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert real_positions({"attention_mask": mask}).tolist() == [[True, True, False], [True, False, False]]
    assert real_positions({"input_mask": mask}) is not None
    assert real_positions({"attention_mask": np.ones((2, 3))}) is None  # nothing padded
    assert real_positions({"attention_mask": np.where(mask, 0.0, -1e4)}) is None  # additive: not guessed at
    assert real_positions({"attention_mask": mask[None]}) is None  # not batch x sequence
    assert real_positions({"mask_of_something": mask}) is None
    positions = real_positions({"attention_mask": mask})
    x = np.arange(2 * 3 * 4.0).reshape(2, 3, 4)
    assert drop_padding(x, positions).tolist() == [x[0, 0].tolist(), x[0, 1].tolist(), x[1, 0].tolist()]
    assert np.array_equal(zero_padding(x, positions)[0, 2], np.zeros(4)) and zero_padding(x, positions)[0, 1, 3] == 7
    pooled = np.ones((2, 4))  # batch x features: no sequence axis, used whole
    assert drop_padding(pooled, positions) is pooled and zero_padding(pooled, positions) is pooled


def test_gram_leaves_out_padded_rows() -> None:
    model = ir.from_proto(_masked_model(random_weight(M, N)))
    layers, _ = find_layers(model)
    data = _data()
    gram = capture_grams(model, layers, data)[layers[0].weight_key]
    real = data["X"][data["attention_mask"].astype(bool)].astype(np.float64)
    np.testing.assert_allclose(gram, real.T @ real, rtol=1e-6)
    every = data["X"].reshape(-1, M).astype(np.float64)
    assert not np.allclose(gram, every.T @ every, rtol=0.1)  # the padding (30x larger) would dominate


def test_verification_compares_real_positions_only(tmp_path: Path) -> None:
    w = random_weight(M, N)
    noisy = w + 0.3 * np.random.default_rng(1).standard_normal(w.shape)
    onnx.save(_masked_model(w), tmp_path / "a.onnx")
    onnx.save(_masked_model(noisy), tmp_path / "b.onnx")
    data = _data()
    np.savez(tmp_path / "data.npz", **data)
    report = verify(tmp_path / "a.onnx", tmp_path / "b.onnx", data=tmp_path / "data.npz", batch_size=3)
    mask = data["attention_mask"].astype(bool)
    y = np.where(mask[..., None], data["X"] @ w + 1, 0).reshape(len(mask), -1)
    y2 = np.where(mask[..., None], data["X"] @ noisy + 1, 0).reshape(len(mask), -1)
    cosines = np.sum(y * y2, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(y2, axis=1)
    (output,) = report.outputs
    assert output.mean_cosine == pytest.approx(np.mean(cosines), rel=1e-5)
    assert output.relative_error == pytest.approx(np.linalg.norm(y2 - y) / np.linalg.norm(y), rel=1e-4)
    assert report.padded_positions == mask.size - mask.sum() > 0
    assert f"{report.padded_positions} padded positions (attention mask 0) left out" in format_verification(report)
    unpadded = verify(tmp_path / "a.onnx", tmp_path / "b.onnx",
                      data={"X": data["X"], "attention_mask": np.ones_like(data["attention_mask"])})
    assert unpadded.padded_positions == 0 and unpadded.outputs[0].max_abs_error > 10 * output.max_abs_error


def _span_model(weight: np.ndarray, second_dim: str) -> onnx.ModelProto:
    """Per-position scores, batch x sequence (as question answering's start logits): sum_j (X @ W)[..., j], the
    output's second dim declared as ``second_dim``."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["H"], name="dense"),
             helper.make_node("ReduceSum", ["H", "last"], ["logits"], keepdims=0)]
    graph = helper.make_graph(
        nodes, "spans",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", M]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", second_dim])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "W"),
                     numpy_helper.from_array(np.array([-1], np.int64), "last")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("second_dim", ["seq", "classes"])
def test_two_dimensional_output_is_masked_only_on_the_masks_named_axis(tmp_path: Path, second_dim: str) -> None:
    """A 2-D output is batch x sequence only when its declared dim is the mask's: its size alone (here SEQ either
    way) cannot tell a sequence axis from a class axis."""
    w = random_weight(M, N)
    noisy = w + 0.3 * np.random.default_rng(1).standard_normal(w.shape)
    onnx.save(_span_model(w, second_dim), tmp_path / "a.onnx")
    onnx.save(_span_model(noisy, second_dim), tmp_path / "b.onnx")
    data = _data()
    report = verify(tmp_path / "a.onnx", tmp_path / "b.onnx", data=data, batch_size=3)
    mask = data["attention_mask"].astype(bool) if second_dim == "seq" else np.ones((len(data["X"]), SEQ), bool)
    y, y2 = (np.where(mask, (data["X"] @ v).sum(-1), 0) for v in (w, noisy))
    cosines = np.sum(y * y2, 1) / np.linalg.norm(y, axis=1) / np.linalg.norm(y2, axis=1)
    (output,) = report.outputs
    assert output.mean_cosine == pytest.approx(np.mean(cosines), rel=1e-5)
    assert output.relative_error == pytest.approx(np.linalg.norm(y2 - y) / np.linalg.norm(y), rel=1e-4)
    assert report.padded_positions == (int(mask.size - mask.sum()) if second_dim == "seq" else 0)


def test_sequence_outputs_need_the_masks_symbolic_dim() -> None:
    def declared(name: str, *shape: int | str | None) -> SimpleNamespace:
        return SimpleNamespace(name=name, shape=list(shape))

    outputs = [declared("start", "b", "s"), declared("pooled", "b", 384), declared("tokens", "b", "s", 384),
               declared("other", "b", "t")]
    assert sequence_outputs([declared("attention_mask", "b", "s")], outputs) == [True, False, False, False]
    assert sequence_outputs([declared("attention_mask", "b", 128)], outputs) == [False] * 4  # fixed: no name
    assert sequence_outputs([declared("attention_mask", "b", None)], [declared("start", "b", None)]) == [False]
    assert sequence_outputs([declared("ids", "b", "s")], outputs) == [False] * 4  # no mask input


def test_layer_response_is_measured_on_real_positions() -> None:
    """Y's padded positions see inputs 30x larger: a response measured there would be another number."""
    proto = _masked_model(random_weight(M, N, decay=0.3))
    model = ir.from_proto(proto)
    layers, _ = find_layers(model)
    data = _data(seed=2)
    (curve,) = weight_curves(layers, capture_grams(model, layers, data))
    response = layer_responses(model, [curve], [data], probes=(0.1,))[curve.key]
    rank = curve.curve.rank_nearest(0.1)
    a, b = curve.curve.factors(rank)
    mask = data["attention_mask"].astype(bool)[..., None]
    y, y2 = data["X"] @ random_weight(M, N, decay=0.3) + mask, data["X"] @ (a @ b) + mask
    distortion = np.sum(np.where(mask, y2 - y, 0) ** 2) / np.sum(np.where(mask, y, 0) ** 2)
    assert response.scale * curve.curve.relative()[rank] == pytest.approx(distortion, rel=1e-3)


def test_sentence_labels_are_left_out_for_token_outputs(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """Labels per sentence cannot score a batch x sequence x hidden output: an argmax over a sentence's every
    token state is no class, and both models would score about 0, so any budget on it would be met."""
    onnx.save(_masked_model(random_weight(M, N)), tmp_path / "tokens.onnx")
    data = _data(samples=40)
    np.savez(tmp_path / "data.npz", **data, labels=np.arange(40) % 2)
    with caplog.at_level("WARNING", logger="onnx_arsvd"):
        report = verify(tmp_path / "tokens.onnx", tmp_path / "tokens.onnx", data=tmp_path / "data.npz")
    assert report.original is None and "its 'labels' array is left out" in caplog.text
    assert "labels need a first output of class scores" in caplog.text
    with pytest.raises(InvalidInputError, match=r"has shape \(\?, \?, 12\)"):
        verify(tmp_path / "tokens.onnx", tmp_path / "tokens.onnx", data=tmp_path / "data.npz",
               labels=np.arange(40) % 2)
    out = tmp_path / "small.onnx"
    capsys.readouterr()  # what the verify calls above printed (with a handler an earlier main() left on the logger)
    assert main(["compress", str(tmp_path / "tokens.onnx"), "-o", str(out), "--data", str(tmp_path / "data.npz"),
                 "--min-params", "0", "-q"]) == 0  # the default budget without usable labels: output cosine
    err = capsys.readouterr().err
    assert "choosing ranks for mean output cosine at least 0.99" in err and err.count("is left out") == 1
    for extra in (["--tau", "0.9"], ["--tau", "0.9", "--no-verify"]):  # said once, whether or not verify reads it
        out.unlink()
        assert main(["compress", str(tmp_path / "tokens.onnx"), "-o", str(out), "--data", str(tmp_path / "data.npz"),
                     "--min-params", "0", "-q", *extra]) == 0
        assert capsys.readouterr().err.count("its 'labels' array is left out") == 1, extra
    assert main(["compress", str(tmp_path / "tokens.onnx"), "-o", str(out), "--data", str(tmp_path / "data.npz"),
                 "--max-drop", "1", "-q"]) == 2
    assert "--max-drop needs labels" in capsys.readouterr().err
