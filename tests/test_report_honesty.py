"""The report says what really happened: why nothing was factored, what a budget was chosen on, what inputs mean."""

from __future__ import annotations

from pathlib import Path

import pytest

from onnx_arsvd import Budget, FixedRankPolicy, compress, format_report, inspect_model
from onnx_arsvd.cli import main

MODELS = Path(__file__).resolve().parent.parent / "models"


def test_nothing_factored_names_the_include_filter(mlp_path: Path) -> None:
    report = inspect_model(mlp_path, include=["no-such-layer*"])
    assert report.factored == 0
    assert "3 of 3 not selected by --include/--exclude" in report.notes[0]
    assert "energy thresholds" not in report.notes[0]  # the threshold advice only when ranks were the cause


def test_nothing_factored_names_the_rank_and_size_gates(mlp_path: Path) -> None:
    report = inspect_model(mlp_path, policy=FixedRankPolicy(40), min_params=1000)
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
