"""Outputs judged by what they mean: class scores and scores per sample by their decisions, values by cosine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import beta

from onnx_arsvd import compress
from onnx_arsvd.config import CompressOptions, DataOptions
from onnx_arsvd.graph.outputs import output_kinds
from onnx_arsvd.measure.results import OutputComparison, VerificationReport
from onnx_arsvd.numerics.rank import FixedRankPolicy
from onnx_arsvd.rules import decide
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.judge import flip_bound, verdict
from tests.conftest import make_linear_model, random_weight

F = TensorProto.FLOAT


def _wake_word() -> onnx.ModelProto:
    """One score per sample: X (batch, 64) -> dense 64x64 -> Relu -> dense 64x1 -> Sigmoid."""
    nodes = [helper.make_node("MatMul", ["X", "W0"], ["h"], name="hidden"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["z"], name="head"), helper.make_node("Sigmoid", ["z"], ["P"])]
    graph = helper.make_graph(nodes, "wake", [helper.make_tensor_value_info("X", F, ["batch", 64])],
                              [helper.make_tensor_value_info("P", F, ["batch", 1])],
                              initializer=[numpy_helper.from_array(random_weight(64, 64, seed=0).astype(np.float32),
                                                                   "W0"),
                                           numpy_helper.from_array(random_weight(64, 1, seed=1).astype(np.float32),
                                                                   "W1")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _per_timestep() -> onnx.ModelProto:
    """Per-timestep class probabilities: X (batch, time, 64) -> dense 64x96 -> Softmax."""
    model = make_linear_model(64, 96, op="MatMul", x_shape=("batch", "time", 64))
    model.graph.node.append(helper.make_node("Softmax", ["Y"], ["P"], axis=-1))
    model.graph.output[0].CopyFrom(helper.make_tensor_value_info("P", F, ["batch", "time", 96]))
    return model


def test_output_kinds_come_from_the_ops_that_make_them() -> None:
    assert output_kinds(ir.from_proto(_wake_word())) == {"P": "score"}
    assert output_kinds(ir.from_proto(_per_timestep())) == {"P": "decisions"}
    assert output_kinds(ir.from_proto(make_linear_model(64, 96, op="MatMul"))) == {"Y": "decisions"}  # a head


def test_the_default_budget_without_labels_counts_decisions_where_an_output_decides() -> None:
    """The cosine of a one-element vector is always 1: a cosine budget was met by anything on a wake-word model."""
    data = {"X": np.random.default_rng(0).standard_normal((40, 64)).astype(np.float32)}
    decided = decide(CompressOptions(data=DataOptions(data=data)), ir.from_proto(_wake_word()))
    assert decided.budget == Budget(max_flips=0.005)


def test_flips_are_counted_per_sample_for_a_score_and_per_position_for_class_scores(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 7, 64)).astype(np.float32)
    _, report = compress(_per_timestep(), policy=FixedRankPolicy(4), min_params=0, factor_heads=True,
                         data={"X": x})
    (output,) = report.verification.outputs
    assert output.kind == "decisions" and output.decisions == 50 * 7 and 0 < output.flips < 350 and output.kl > 0
    _, report = compress(_wake_word(), policy=FixedRankPolicy(2), min_params=0, factor_heads=True,
                         data={"X": rng.standard_normal((300, 64)).astype(np.float32)})
    (score,) = report.verification.outputs
    assert score.kind == "score" and score.decisions == 300 and score.spread_error is not None
    assert score.mean_cosine == pytest.approx(1.0)  # what a cosine budget would have read: nothing


def test_a_score_decides_at_the_threshold_the_user_gives(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A detector that fires above 0.65, not 0.5: flips are counted at 0.65 in the verification, the search's judge
    and the CLI's `verify`, and the report says which threshold read them. (A flip budget on a model given as a
    ModelProto used to fail: the search read its outputs as values.)"""
    from onnx_arsvd.cli.main import main

    x = np.random.default_rng(3).standard_normal((400, 64)).astype(np.float32)
    options = {"policy": FixedRankPolicy(2), "min_params": 0, "factor_heads": True, "data": {"X": x}}
    _, default = compress(_wake_word(), **options)
    _, strict = compress(_wake_word(), score_threshold=0.65, **options)
    (at_half,), (at_high,) = default.verification.outputs, strict.verification.outputs
    assert (at_half.threshold, at_high.threshold) == (0.5, 0.65)
    original = run_scores(_wake_word(), x)
    assert at_high.decisions == 400 and at_high.flips != at_half.flips  # read at another threshold
    assert 0 < np.mean(original > 0.65) < np.mean(original > 0.5)  # both thresholds split this data
    source, data = tmp_path / "wake.onnx", tmp_path / "x.npz"
    onnx.save(_wake_word(), source)
    np.savez(data, X=x)
    assert main(["verify", str(source), str(source), "--data", str(data), "--score-threshold", "0.65"]) == 0
    assert "0 of 400 (0.00%), at 0.65" in capsys.readouterr().out
    many = np.random.default_rng(4).standard_normal((2000, 64)).astype(np.float32)
    _, searched = compress(_wake_word(), data={"X": many}, budget=Budget(max_flips=0.05), score_threshold=0.65,
                           min_params=0)
    assert searched.verification.outputs[0].threshold == 0.65


def run_scores(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    from tests.conftest import run

    return run(model, {"X": x})[0].reshape(-1)


def test_the_flip_bound_is_an_exact_binomial_prediction_bound() -> None:
    assert flip_bound(0, 1000, 0) == pytest.approx(1 - 0.05 ** (1 / 1000), rel=1e-6)  # no flip: the rule of three
    assert flip_bound(0, 1000, 1000) == pytest.approx(1 - 0.05 ** (1 / 500), rel=1e-6)  # a held part as large
    assert flip_bound(10, 1000, 1000) == pytest.approx(beta.ppf(0.95, 6, 495))  # 5 of an effective 500
    assert flip_bound(10, 1000, 1000) > 0.01 + 1.645 * np.sqrt(0.01 * 0.99 / 500)  # wider than the normal bound


def test_a_flip_budget_is_judged_on_the_output_that_decides_worst() -> None:
    outputs = [OutputComparison("embedding", 0.0, 0.0, 0.5, 0.5),  # values: not judged by flips
               OutputComparison("classes", 0.0, 0.0, 1.0, 1.0, kind="decisions", decisions=2000, flips=2)]
    result = VerificationReport("CPUExecutionProvider", "hand-made", 2000, outputs)
    bound, ok = verdict(Budget(max_flips=0.005), result, 0)
    assert ok and bound == pytest.approx(flip_bound(2, 2000, 0))
    assert not verdict(Budget(max_flips=0.001), result, 0)[1]
    assert verdict(Budget(max_flips=0.005), VerificationReport("CPU", "", 10, outputs[:1]), 0) == (None, False)
