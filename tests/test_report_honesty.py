"""The report says what really happened: why nothing was factored, what a budget was chosen on, what inputs mean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnx_arsvd import Budget, FixedRankPolicy, compress, format_report, inspect_model
from onnx_arsvd.cli.main import main

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_nothing_factored_names_the_include_filter(mlp_path: Path) -> None:
    report = inspect_model(mlp_path, include=["no-such-layer*"], factor_heads=True)
    assert report.factored == 0
    assert "3 of 3 not selected by `include`/`exclude`" in report.notes[0]
    assert "energy thresholds" not in report.notes[0]  # the threshold advice only when ranks were the cause


def test_nothing_factored_names_the_rank_and_size_gates(mlp_path: Path) -> None:
    report = inspect_model(mlp_path, policy=FixedRankPolicy(40), min_params=1000, factor_heads=True)
    causes = report.notes[0]
    assert "saves too little" in causes and "too small to pay off" in causes


def test_parameter_budget_with_data_calibrates_and_holds_out() -> None:
    _, report = compress(MODELS / "digits_mlp.onnx", budget=Budget(target_params=0.5),
                         data=MODELS / "digits_test.npz")
    assert report.method.startswith("whitened")
    assert report.budget is not None and report.budget["measure"] is None
    assert report.budget["samples"]["held_out"] == report.verification.samples > 0
    text = format_report(report)
    assert "chosen by the parameter count alone" in text and "none" not in text.split("budget:")[1].splitlines()[1]


def test_generated_inputs_are_flagged_as_no_evidence_of_accuracy(mlp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compress", str(mlp_path), "-o", str(mlp_path.with_name("out.onnx")), "--ratio", "0.3",
                 "--dim", "batch=2", "-q"]) == 0
    captured = capsys.readouterr()
    assert "these inputs are generated" in captured.out
    assert "onnx-arsvd: warning: verified on generated inputs only" in captured.err


def test_embedding_tables_are_counted_apart_from_dense_layers() -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"], name="embed"),
         helper.make_node("MatMul", ["h", "W"], ["Y"], name="proj")],
        "embed_then_project",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 64])],
        initializer=[numpy_helper.from_array(rng.standard_normal((200, 64)).astype(np.float32), "table"),
                     numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = inspect_model(model, policy=FixedRankPolicy(8), embedding_policy=FixedRankPolicy(8), factor_heads=True)
    assert (report.dense_params_before, report.dense_params_after) == (64 * 64, 8 * 128)
    assert (report.embedding_params_before, report.embedding_params_after) == (200 * 64, 8 * 264)
    text = format_report(report)
    assert "dense-layer parameters: 4096 -> 1024 (25.0% kept)" in text
    assert "embedding-table parameters: 12.8k -> 2112 (16.5% kept)" in text


def test_weights_in_constant_nodes_count() -> None:
    """A model whose weights are all Constant nodes reports them (it printed 0 -> 0, then 0 -> 548.7k)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((96, 80)).astype(np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["W"], value=weight), helper.make_node("MatMul", ["X", "W"], ["Y"])],
        "constant_weight",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 96])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 80])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    _, report = compress(model, policy=FixedRankPolicy(8), check=False, factor_heads=True)
    assert report.params_before == 96 * 80 and report.weight_bytes_before == 96 * 80 * 4
    assert report.params_after == 8 * (96 + 80)


def test_without_data_the_cli_keeps_heads_dense(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A classifier head is the layer whose truncation costs most: without real data to check it, it stays dense."""
    base = ["inspect", str(mlp_path), "--policy", "rank", "--rank", "2", "--min-params", "0", "--json", "-q"]
    assert main(base) == 0
    reasons = {row["name"]: row["reason"] for row in json.loads(capsys.readouterr().out)["layers"]}
    assert reasons["fc0"] == "" and reasons["fc1"] == "" and reasons["fc2"].startswith("feeds a graph output")
    assert main([*base, "--factor-heads"]) == 0
    assert all(row["factored"] for row in json.loads(capsys.readouterr().out)["layers"])


def test_data_without_a_policy_runs_a_budget(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--data and no policy: the CLI chooses ranks for a 1-point budget (labels) instead of a blind threshold."""
    out = tmp_path / "small.onnx"
    assert main(["compress", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--data",
                 str(MODELS / "digits_test.npz"), "--json", "-q"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["budget"]["budget"] == "at most 1 accuracy points lost"
    assert "no rank policy given" in captured.err
    assert report["factored_layers"] >= 1
