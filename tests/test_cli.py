"""The command line on real files: reports, JSON, and every kind of bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd.cli.main import main
from tests.conftest import make_linear_model, make_mlp, run


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_inspect_prints_one_row_per_layer(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mlp_path), "--policy", "rank", "--rank", "4", "-q"]) == 0
    out = capsys.readouterr().out
    for name in ("fc0", "fc1", "fc2"):
        assert name in out
    assert "break-even" in out and "energy kept" in out


def test_inspect_json_has_every_column(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mlp_path), "--tau", "0.9", "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    first = data["layers"][0]
    assert first["name"] == "fc0" and first["shape"] == [48, 40]
    assert first["break_even"] == pytest.approx(48 * 40 / 88)
    assert {"rank", "energy_kept", "params", "params_after", "saving", "factored", "reason"} <= set(first)
    assert data["policy"] == "energy(tau=0.9)"


def test_compress_writes_verified_model_and_report(mlp_path: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out, report = tmp_path / "small.onnx", tmp_path / "report.json"
    before = _digest(mlp_path)
    assert main(["compress", str(mlp_path), "-o", str(out), "--policy", "ratio", "--ratio", "0.25",
                 "--dim", "batch=4", "--min-params", "0", "--factor-heads", "--report", str(report), "-q"]) == 0
    assert "verification on CPUExecutionProvider" in capsys.readouterr().out
    assert _digest(mlp_path) == before
    onnx.checker.check_model(str(out), full_check=True)
    data = json.loads(report.read_text())
    assert data["factored_layers"] == 3 and data["verification"]["samples"] == 64
    assert data["dense_params_after"] < data["dense_params_before"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".onnx-arsvd")] == []


def test_small_and_excluded_layers_stay_in_the_table(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mlp_path), "--policy", "rank", "--rank", "2", "--min-params", "1500",
                 "--exclude", "fc1", "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    decisions = {row["name"]: (row["factored"], row["reason"]) for row in data["layers"]}
    assert decisions == {
        "fc0": (True, ""),  # 48 x 40 = 1920 parameters
        "fc1": (False, "matched by `exclude`"),
        "fc2": (False, "too small to pay off (< 1500 parameters)"),  # 32 x 10 = 320
    }
    assert data["dense_params_before"] == 48 * 40 + 40 * 32 + 32 * 10
    assert data["dense_params_after"] == 2 * (48 + 40) + 40 * 32 + 32 * 10


def test_verify_with_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_path = tmp_path / "m.onnx"
    onnx.save(make_mlp(), model_path)
    x = np.random.default_rng(0).standard_normal((50, 48)).astype(np.float32)
    labels = run(make_mlp(), {"X": x})[0].argmax(axis=1)
    np.savez(tmp_path / "data.npz", X=x, labels=labels)
    assert main(["verify", str(model_path), str(model_path), "--data", str(tmp_path / "data.npz"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["original"]["accuracy"] == 1.0 and data["accuracy_drop_points"] == 0.0
    assert data["outputs"][0]["max_abs_error"] == 0.0


def _write(path: Path, model: onnx.ModelProto) -> Path:
    onnx.save(model, path)
    return path


def _model_with_weight(weight: np.ndarray) -> onnx.ModelProto:
    model = make_linear_model(op="MatMul", x_shape=("batch", 32))
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weight, "W"))
    return model


def _no_layer_model() -> onnx.ModelProto:
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "relu",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])])
    return helper.make_model(graph)


def _quantized_model() -> onnx.ModelProto:
    """A QDQ model: the MatMul's weight is an int8 initializer behind DequantizeLinear."""
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["Wq", "scale"], ["W"]),
         helper.make_node("MatMul", ["X", "W"], ["Y"], name="qdense")],
        "qdq",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4])],
        initializer=[numpy_helper.from_array(np.ones((8, 4), np.int8), "Wq"),
                     numpy_helper.from_array(np.array(0.1, np.float32), "scale")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _nan_weight() -> np.ndarray:
    weight = np.ones((32, 24), np.float32)
    weight[3, 4] = np.nan
    return weight


BAD_MODELS = {
    "missing": (None, 2, "no such file"),
    "not-onnx": (b"hello, this is not a model\n", 1, "not a readable ONNX model"),
    "empty-file": (b"", 1, "not an ONNX model (no graph found)"),
    "truncated": ("truncate", 1, "not a readable ONNX model"),
    "no-layer": (_no_layer_model, 1, "no factorable layer"),
    "integer-weight": (lambda: _model_with_weight(np.ones((32, 24), np.int32)), 1, "weight has dtype INT32"),
    "nan-weight": (lambda: _model_with_weight(_nan_weight()), 1, "contains NaN or Inf"),
    "quantized-weight": (_quantized_model, 1, "weight comes from DequantizeLinear (quantized model)"),
}


LISTED_BY_INSPECT = {  # what inspect prints instead of failing: its "not factored" list, or that nothing was found
    "no-layer": "no candidate layer",
    "integer-weight": "weight has dtype INT32",
    "quantized-weight": "weight comes from DequantizeLinear (quantized model)",
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
@pytest.mark.parametrize("command", ["inspect", "compress"])
def test_bad_model_one_line_error_and_no_output(case: str, command: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    content, code, message = BAD_MODELS[case]
    path = tmp_path / "model.onnx"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "truncate":
        path.write_bytes(make_mlp().SerializeToString()[:700])
    elif content is not None:
        _write(path, content())
    before = _digest(path) if path.exists() else None
    out = tmp_path / "out.onnx"
    argv = [command, str(path), "-q"] + (["-o", str(out)] if command == "compress" else [])
    if command == "inspect" and case in LISTED_BY_INSPECT:  # inspect lists what it passed over instead of failing
        assert main(argv) == 0
        captured = capsys.readouterr()
        assert captured.err == "" and LISTED_BY_INSPECT[case] in captured.out
    else:
        assert main(argv) == code
        err = capsys.readouterr().err
        assert err.startswith("onnx-arsvd: error: ") and message in err and err.count("\n") == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == (["model.onnx"] if before else [])
    assert (_digest(path) if path.exists() else None) == before


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tau", "0"], "tau must be in (0, 1]"),
        (["--tau", "1.01"], "tau must be in (0, 1]"),
        (["--policy", "magic"], "unknown policy 'magic'"),
        (["--policy", "ratio", "--tau", "0.9"], "--tau does not apply to --policy ratio"),
        (["--dim", "batch"], "--dim expects NAME=POSITIVE_INTEGER"),
        (["--dim", "sequence=16"], "dimension sequence: no dynamic dimension of that name; the model's are: batch"),
        (["--data", "missing.npz"], "no such data file"),
        (["--labels", "missing.npy"], "no such labels file"),
        (["--max-rank-fraction", "0"], "max rank fraction must be positive"),
        (["--report", "nowhere/report.json"], "nowhere: --report folder does not exist"),
        (["--method", "lp", "--p", "3"], "p must be in [1, 2], got 3.0"),
        (["--method", "lp", "--calibration", "c.npz"], "calibration inputs are only used by the whitened method"),
        (["--bench", "--providers", "nonesuch"], "no requested execution provider can run here"),
        (["--bench", "--batch", "0"], "--batch expects positive integers"),
    ],
)
def test_bad_options_are_usage_errors(options: list[str], message: str, mlp_path: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.onnx"
    assert main(["compress", str(mlp_path), "-o", str(out), "-q", *options]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_output_equal_to_input_is_refused(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _digest(mlp_path)
    assert main(["compress", str(mlp_path), "-o", str(mlp_path), "-q"]) == 2
    assert "-o would overwrite the input model file" in capsys.readouterr().err
    assert _digest(mlp_path) == before


def test_usage_error_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compress"]) == 2
    assert main(["--help"]) == 0


def test_compress_with_bench_reports_both(mlp_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.onnx"
    assert main(["compress", str(mlp_path), "-o", str(out), "--policy", "rank", "--rank", "4", "--min-params", "0",
                 "--factor-heads", "--bench", "--batch", "2", "--seconds", "0.01", "--no-memory", "--json", "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["factored_layers"] == 3
    assert [c["batch"] for c in data["benchmark"]["latency"]] == [2]
    assert data["benchmark"]["dense_flop_ratio"] == pytest.approx(data["dense_params_after"]
                                                                  / data["dense_params_before"])
