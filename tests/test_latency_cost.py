"""Measured latency as the allocation's cost: the guard's table prices every rank a layer may take."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnx_arsvd import compress
from onnx_arsvd.api import BudgetMissedError
from onnx_arsvd.cli.main import main
from onnx_arsvd.config import CompressOptions, DataOptions, LatencyGuard
from onnx_arsvd.errors import InvalidInputError, OutputError
from onnx_arsvd.graph.layers import Layer, find_layers
from onnx_arsvd.io.models import load_model
from onnx_arsvd.measure.guard import LatencyTable, observed_rows, timing_key
from onnx_arsvd.measure.latency_cost import latency_costs, rank_grid
from onnx_arsvd.measure.results import LatencyComparison, LatencyStats, LayerTiming
from onnx_arsvd.methods.lowrank.curves import weight_curves, weight_options
from onnx_arsvd.numerics.allocate import DENSE, layer_options, option_ranks
from onnx_arsvd.report.model_report import format_report
from onnx_arsvd.rules import decide
from onnx_arsvd.search.budget import Budget
from tests.conftest import MODELS

CPU = "CPUExecutionProvider"


def test_rank_grid_doubles_from_the_smallest_rank_and_ends_at_the_largest() -> None:
    assert rank_grid(list(range(8, 241, 8))) == [8, 16, 32, 64, 128, 240]
    assert rank_grid([8, 16]) == [8, 16] and rank_grid([24]) == [24] and rank_grid([]) == []
    assert rank_grid(list(range(1, 9))) == [1, 2, 4, 8]


def test_a_rank_costing_no_less_than_dense_is_not_offered() -> None:
    shape = (640, 480)
    losses = np.linspace(1.0, 0.0, 481) ** 3
    slow_above_100 = layer_options("w", shape, losses, multiple=8,
                                   cost=lambda s, k: 1.0 if k == DENSE else (0.5 if k <= 100 else 1.0))
    offered = {rank for _, _, rank in slow_above_100.choices}
    assert offered == {*range(8, 101, 8), DENSE}
    assert option_ranks(shape, multiple=8) == list(range(8, 220, 8))


def _fashion() -> tuple[ir.Model, list[Layer], dict[str, np.ndarray]]:
    """The Fashion MLP loaded, its layers, and its first 8 test images."""
    model = load_model(MODELS / "fashion_mlp.onnx")
    with np.load(MODELS / "fashion_test.npz") as archive:
        feed = {"input": archive["input"][:8]}
    return model, find_layers(model)[0], feed


def test_latency_costs_price_each_offered_rank_from_real_timings() -> None:
    """On the Fashion MLP, timed for real: the dense layers' costs add up to one per batch size, factored
    costs never fall as the rank grows, and the 256 x 10 head (no rank offered) costs nothing."""
    model, layers, feed = _fashion()
    curves = weight_curves(layers)
    table = LatencyTable(LatencyGuard(batches=(1, 8), layer_seconds=0.02))
    rows = observed_rows(model, layers, feed)
    priced = latency_costs(curves, table, CPU, rows, {}, multiple=8, max_rank_fraction=0.8, min_params=4096)
    offered = {c.key: option_ranks(c.curve.shape, multiple=8, min_params=4096) for c in curves}
    assert len(table) == sum(len(rank_grid(ranks)) for ranks in offered.values()) == 12
    assert sum(priced.costs[c.key](c.curve.shape, DENSE) for c in curves) == pytest.approx(2.0)
    head = curves[-1]
    assert head.curve.shape == (256, 10) and priced.costs[head.key](head.curve.shape, DENSE) == 0.0
    assert priced.costs[head.key](head.curve.shape, 4) == np.inf and priced.unpriced == []
    for c in curves[:-1]:
        cost = priced.costs[c.key]
        factored = [cost(c.curve.shape, k) for k in offered[c.key]]
        finite = [f for f in factored if np.isfinite(f)]
        assert finite and finite == sorted(finite) and max(finite) < cost(c.curve.shape, DENSE)
        assert all(np.isinf(f) for f in factored[len(finite):])  # once not cheaper, never cheaper at a larger rank
    assert "measured latency on CPU at batch 1, 8 (12 timings in the table; 2 weights priced)" == priced.description


def test_ranks_are_priced_by_their_summed_share_of_the_layers_latency() -> None:
    """A table where factored fc1 costs 0.02 x rank of dense at batch 1 and 0.001 x rank at batch 8 (one slow
    timing at rank 8, batch 8), and fc2 costs half of dense at any rank; dense fc1 and fc2 take 1 ms each.

    Each dense layer is half of the layers' latency at each batch size: fc1 costs 1.0 dense and
    (0.02 + 0.001) x rank / 2 factored, below dense up to rank 95 (rank 64 is offered although it is slower
    at batch 1: it saves in sum, and the guard has the last word per batch size); the slow timing is
    pooled by the isotonic fit, so no larger rank is priced below a smaller one.
    """
    model, layers, _ = _fashion()
    curves = weight_curves(layers)
    guard = LatencyGuard(batches=(1, 8))
    table = LatencyTable(guard)
    fc1, fc2 = curves[0], curves[1]
    for rank in rank_grid(option_ranks(fc1.curve.shape, multiple=8, min_params=4096)):
        slow = 0.02 if rank == 8 else 0.001 * rank  # rank 8 timed slower than rank 16 (0.016)
        table.record(timing_key(fc1.layers[0], rank, CPU, guard.batches, {}),
                     (LayerTiming(1, 1, 1.0, 0.02 * rank), LayerTiming(8, 8, 1.0, slow)))
    for rank in rank_grid(option_ranks(fc2.curve.shape, multiple=8, min_params=4096)):
        table.record(timing_key(fc2.layers[0], rank, CPU, guard.batches, {}),
                     (LayerTiming(1, 1, 1.0, 0.5), LayerTiming(8, 8, 1.0, 0.5)))
    priced = latency_costs(curves, table, CPU, {}, {}, multiple=8, max_rank_fraction=0.8, min_params=4096)
    options = weight_options(curves, costs=priced.costs, min_params=4096)
    assert {rank for _, _, rank in options[0].choices} == {*range(8, 89, 8), DENSE}
    assert options[0].costs[-1] == pytest.approx(1.0) and options[1].costs[-1] == pytest.approx(1.0)
    assert priced.costs[fc1.key](fc1.curve.shape, 80) == pytest.approx((1.6 + 0.08) / 2)
    assert priced.costs[fc2.key](fc2.curve.shape, 24) == pytest.approx(0.5)
    # the isotonic fit pools ranks 8 and 16 at batch 8 (0.02 and 0.016: 0.018), so rank 16 is no cheaper than 8
    assert priced.costs[fc1.key](fc1.curve.shape, 8) == pytest.approx((0.16 + 0.018) / 2)
    assert priced.costs[fc1.key](fc1.curve.shape, 16) == pytest.approx((0.32 + 0.018) / 2)


def test_minimizing_latency_under_a_budget_ships_only_faster_layers(tmp_path: Path) -> None:
    guard = LatencyGuard(batches=(1, 8), layer_seconds=0.02, model_seconds=0.05)
    _, report = compress(MODELS / "fashion_mlp.onnx", tmp_path / "fast.onnx", budget=Budget(max_drop=1.0,
                         minimize="latency"), data=MODELS / "fashion_test.npz", guard=guard)
    budget = report.budget
    assert budget["met"] and "cost: measured latency on CPU at batch 1, 8" in budget["allocation"]
    latencies = [step["latency"] for step in budget["steps"]]
    assert latencies[0] == pytest.approx(1.0)  # the all-dense end, tried first
    chosen = min((s for s in budget["steps"] if s["feasible"]), key=lambda s: s["latency"])
    assert 0.0 < chosen["latency"] < 1.0 and report.factored >= 1
    for layer in report.layers:
        if layer.factored:
            assert layer.timings and all(t.factored_ms < t.dense_ms for t in layer.timings)
    assert report.verification.accuracy_drop <= 1.0 and (tmp_path / "fast.onnx").is_file()


def test_a_budget_that_prices_latency_gets_the_default_guard_and_needs_an_accuracy_budget() -> None:
    model = load_model(MODELS / "fashion_mlp.onnx")
    for budget in (Budget(max_drop=1.0, minimize="latency"), Budget(target_latency=0.5)):
        decided = decide(CompressOptions(budget=budget, data=DataOptions(data=MODELS / "fashion_test.npz")), model)
        assert decided.guard == LatencyGuard() and decided.budget == budget
    mine = LatencyGuard(batches=(8,))
    assert decide(CompressOptions(budget=Budget(target_latency=0.5), guard=mine), model).guard is mine
    with pytest.raises(InvalidInputError, match="needs an accuracy budget"):
        Budget(target_params=0.3, minimize="latency")
    with pytest.raises(InvalidInputError, match="needs the global allocation"):
        Budget(max_drop=1.0, minimize="latency", allocation="threshold")
    with pytest.raises(InvalidInputError, match="unknown cost to minimize 'speed'"):
        Budget(max_drop=1.0, minimize="speed")


def test_cli_minimize_latency_turns_the_guard_on(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fast.onnx"
    assert main(["compress", str(MODELS / "fashion_mlp.onnx"), "-o", str(out), "--data",
                 str(MODELS / "fashion_test.npz"), "--max-drop", "1", "--minimize", "latency", "--batch", "1,8",
                 "--guard-seconds", "0.02", "--seconds", "0.05", "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "cost: measured latency on CPU at batch 1, 8" in report["budget"]["allocation"]
    assert [c["batch"] for c in report["latency_check"]] == [1, 8] and out.is_file()


def test_a_latency_target_returns_the_most_accurate_point_timed_within_it(tmp_path: Path) -> None:
    """The search's mechanics, whatever the machine's load: the point it keeps lies just under the target by its
    own bound, so the final timing (a fresh median, 0.05 s here) may land either side, and both outcomes are
    checked: met, the model is written; missed, nothing is and the error says by how much."""
    guard = LatencyGuard(batches=(1, 8), layer_seconds=0.02, model_seconds=0.05)
    out = tmp_path / "fast.onnx"
    try:
        _, report = compress(MODELS / "fashion_mlp.onnx", out, budget=Budget(target_latency=0.9),
                             data=MODELS / "fashion_test.npz", guard=guard)
    except BudgetMissedError as missed:
        assert "is missed in the final timing" in str(missed) and not out.exists()
        report = missed.report
        assert any(c.ratio > 0.9 for c in report.latency_check)
    else:
        assert report.budget["met"] and out.is_file()
    budget = report.budget
    assert budget["timed"] and "cost: measured latency on CPU at batch 1, 8" in budget["allocation"]
    steps = budget["steps"]
    assert steps[0]["point"] == 0 and all(s["value"] is not None for s in steps)  # the fastest end, tried first
    assert all(s["feasible"] == (s["value"] <= 0.9) for s in steps)
    chosen = max((s for s in steps if s["feasible"]), key=lambda s: s["point"])
    assert 0.0 < chosen["params_kept"] < 1.0 and report.factored >= 1
    assert report.verification is not None and report.verification.samples == 4000
    assert [c.batch for c in report.latency_check] == [1, 8]
    assert "chosen by timing each candidate's whole model against the original" in format_report(report)


def test_the_latency_bound_widens_with_the_rounds_spread() -> None:
    stats = LatencyStats(1.0, 1.0, 1.0, 1.0, 10)
    spread = LatencyComparison(CPU, 1, stats, stats, 0.6, 0.5, 0.7, (0.5, 0.6, 0.7))
    assert spread.ratio_bound() == pytest.approx(0.6 + 1.645 * 0.1 * np.sqrt(4 / 3))
    assert LatencyComparison(CPU, 1, stats, stats, 0.6, 0.5, 0.7, (0.6, 0.6, 0.6)).ratio_bound() == 0.6
    assert LatencyComparison(CPU, 1, stats, stats, 0.6, 0.5, 0.7, (0.9,)).ratio_bound() == 0.6  # no spread known


def test_an_unreachable_latency_target_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fast.onnx"
    code = main(["compress", str(MODELS / "fashion_mlp.onnx"), "-o", str(out), "--data",
                 str(MODELS / "fashion_test.npz"), "--target-latency", "0.001", "--batch", "1",
                 "--guard-seconds", "0.02", "--seconds", "0.05", "-q"])
    assert code == 1 and not out.exists()
    assert "not met even by the fastest allocation searched; nothing written" in capsys.readouterr().err
    with pytest.raises(InvalidInputError, match="target_latency must be in"):
        Budget(target_latency=1.5)
    with pytest.raises(InvalidInputError, match="a latency target needs the global allocation"):
        Budget(target_latency=0.5, allocation="threshold")
    with pytest.raises(InvalidInputError, match="a parameter target and a latency target"):
        Budget(target_latency=0.5, target_params=0.3)


def test_a_latency_target_with_an_accuracy_budget_times_the_fastest_point_within_it(tmp_path: Path) -> None:
    guard = LatencyGuard(batches=(1, 8), layer_seconds=0.02, model_seconds=0.05)
    budget = Budget(max_drop=1.0, target_latency=0.9)
    assert budget.describe() == "at most 1 accuracy points lost, whole-model latency at most 0.9x the original's"
    _, report = compress(MODELS / "fashion_mlp.onnx", tmp_path / "fast.onnx", budget=budget,
                         data=MODELS / "fashion_test.npz", guard=guard)
    searched = report.budget
    assert searched["met"] and not searched["timed"] and 0.0 < searched["latency_bound"] <= 0.9
    assert "cost: measured latency" in searched["allocation"]  # the fastest point within the accuracy budget
    assert report.verification.accuracy_drop <= 1.0 and (tmp_path / "fast.onnx").is_file()
    out = tmp_path / "too_fast.onnx"
    with pytest.raises(OutputError, match="the fastest model within the accuracy budget times at up to"):
        compress(MODELS / "fashion_mlp.onnx", out, budget=Budget(max_drop=1.0, target_latency=0.001),
                 data=MODELS / "fashion_test.npz", guard=guard)
    assert not out.exists()
