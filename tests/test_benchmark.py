"""Benchmark statistics, provider discovery, the memory probe, the report, and the latency guard.

No test asserts a wall-clock time: timings are only checked for shape and internal consistency.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_arsvd import FixedRankPolicy, compress
from onnx_arsvd.bench_report import benchmark_to_json, format_benchmark, plot_benchmark
from onnx_arsvd.benchmark import (
    benchmark_models,
    compare_latency,
    dense_flop_ratio,
    discover_providers,
    interleaved_times,
    latency_stats,
    measure_memory,
    timed_rounds,
)
from onnx_arsvd.candidates import find_layers
from onnx_arsvd.cli import main
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.guard import LatencyGuard, _layer_models, activation_rows, guard_verdict
from onnx_arsvd.results import LayerTiming
from onnx_arsvd.verification import make_session
from tests.conftest import make_linear_model, make_mlp, random_weight

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_latency_stats() -> None:
    seconds = np.arange(1, 101) / 1000.0  # 1 ms .. 100 ms
    stats = latency_stats(seconds, batch=10)
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p90_ms == pytest.approx(90.1) and stats.p99_ms == pytest.approx(99.01)
    assert stats.throughput == pytest.approx(10 / 0.0505) and stats.runs == 100


def test_ratio_comes_from_the_pairs() -> None:
    original = np.array([1.0, 2.0, 4.0, 1.0, 2.0])
    compressed = np.array([0.5, 1.0, 2.0, 1.0, 0.2])  # pair ratios .5 .5 .5 1 .1
    result = compare_latency("CPUExecutionProvider", 1, [(original[:3], compressed[:3]), (original[3:], compressed[3:])])
    assert result.ratio == 0.5
    assert result.ratio_p10 == pytest.approx(np.percentile([0.5, 0.5, 0.5, 1.0, 0.1], 10))
    assert result.ratio_p90 == pytest.approx(np.percentile([0.5, 0.5, 0.5, 1.0, 0.1], 90))
    assert result.round_ratios == (0.5, pytest.approx(0.55))
    assert result.original.runs == 5 and not result.consistently_slower


def test_slower_only_when_every_round_agrees() -> None:
    base = np.ones(10)
    two_of_three = compare_latency("CPUExecutionProvider", 1, [(base, base * 1.1), (base, base * 1.1), (base, base * 0.95)])
    every_round = compare_latency("CPUExecutionProvider", 1, [(base, base * 1.1), (base, base * 1.02), (base, base * 1.05)])
    single_round = compare_latency("CPUExecutionProvider", 1, [(base, base * 1.5)])
    assert two_of_three.ratio > 1.0 and not two_of_three.consistently_slower
    assert every_round.consistently_slower
    assert not single_round.consistently_slower  # one pair of sessions cannot tell session noise apart


def test_rounds_use_fresh_sessions() -> None:
    model = make_mlp().SerializeToString()
    rounds = timed_rounds(model, model, {"X": np.ones((2, 48), np.float32)}, rounds=3, min_seconds=0.0, min_runs=4)
    assert len(rounds) == 3 and all(len(a) == len(b) == 4 for a, b in rounds)


def test_interleaved_times_measure_both_sessions_equally() -> None:
    session = make_session(make_mlp().SerializeToString())
    feed = {"X": np.ones((2, 48), np.float32)}
    first, second = interleaved_times(session, session, feed, warmup=1, min_runs=7, min_seconds=0.0)
    assert len(first) == len(second) == 7 and np.all(first > 0) and np.all(second > 0)


def test_cpu_is_always_discovered() -> None:
    providers, notes = discover_providers()
    assert providers[0] == "CPUExecutionProvider" or "CPUExecutionProvider" in providers
    assert "AzureExecutionProvider" not in providers


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present: the absent-GPU path cannot be exercised here")
def test_gpu_providers_are_skipped_cleanly_when_absent() -> None:
    providers, notes = discover_providers(["cpu", "cuda", "tensorrt"])
    assert providers == ["CPUExecutionProvider"]
    assert any(n.startswith("CUDAExecutionProvider skipped") for n in notes)
    with pytest.raises(InvalidInputError, match="no requested execution provider can run here"):
        discover_providers(["cuda"])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")
def test_cuda_bench_runs(tmp_path: Path) -> None:
    original, small = _pair(tmp_path)
    result = benchmark_models(original, small, batches=(1,), providers=["cuda"], min_seconds=0.05, memory=False)
    assert result.providers == ["CUDAExecutionProvider"] and result.accuracy["CUDAExecutionProvider"].samples > 0


def _big_weight_model(m: int, n: int) -> onnx.ModelProto:
    """One MatMul with an m x n float32 weight (random normal: no decomposition needed to build it)."""
    model = make_linear_model(8, 8, op="MatMul", x_shape=("batch", 8))
    weight = np.random.default_rng(0).standard_normal((m, n), dtype=np.float32)
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(weight, "W"))
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = m
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = n
    return model


def test_memory_probe_sees_the_weights(tmp_path: Path) -> None:
    small, big = tmp_path / "small.onnx", tmp_path / "big.onnx"
    onnx.save(_big_weight_model(64, 32), small)
    onnx.save(_big_weight_model(4096, 2048), big)  # 32 MiB of float32 weights
    _, small_increase = measure_memory(small, "CPUExecutionProvider", {"X": np.ones((1, 64), np.float32)})
    peak, big_increase = measure_memory(big, "CPUExecutionProvider", {"X": np.ones((1, 4096), np.float32)})
    assert small_increase is not None and big_increase is not None
    assert big_increase - small_increase > 24 * 2**20  # at least most of the 32 MiB shows up
    assert peak > big_increase


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    original, small = tmp_path / "mlp.onnx", tmp_path / "small.onnx"
    onnx.save(make_mlp(), original)
    compress(original, small, policy=FixedRankPolicy(4), min_params=0, check=False)
    return original, small


def test_dense_flop_ratio_matches_the_ranks(tmp_path: Path) -> None:
    original, small = _pair(tmp_path)
    sizes = [(48, 40), (40, 32), (32, 10)]
    expected = sum(4 * (m + n) for m, n in sizes) / sum(m * n for m, n in sizes)
    assert dense_flop_ratio(ir.load(original), ir.load(small)) == pytest.approx(expected)


def test_benchmark_result_and_its_reports(tmp_path: Path) -> None:
    original, small = _pair(tmp_path)
    result = benchmark_models(original, small, batches=(1, 3), providers=["cpu"], min_seconds=0.01)
    assert [(c.provider, c.batch) for c in result.latency] == [("CPUExecutionProvider", 1), ("CPUExecutionProvider", 3)]
    assert result.memory["compressed"].weight_params < result.memory["original"].weight_params
    assert result.memory["original"].file_bytes == original.stat().st_size
    text = format_benchmark(result)
    assert "ratio comp/orig [p10, p90]" in text and "limit" in text and "peak RSS MiB" in text
    assert "thread spinning off" in text
    data = json.loads(benchmark_to_json(result))
    assert data["machine"]["cpus"] and len(data["latency"]) == 2 and data["accuracy"]["CPUExecutionProvider"]
    assert "| provider" in format_benchmark(result, markdown=True)
    png = plot_benchmark(result, tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_guard_verdict_logic() -> None:
    faster = [LayerTiming(1, 1, 1.0, 0.5), LayerTiming(32, 32, 2.0, 1.0)]
    slower_at_one = [LayerTiming(1, 1, 1.0, 1.16), LayerTiming(32, 32, 2.0, 1.0)]
    within_noise = [LayerTiming(1, 1, 1.0, 0.97)]
    assert guard_verdict(faster, "CPUExecutionProvider") == ""
    assert guard_verdict(slower_at_one, "CPUExecutionProvider") == (
        "latency guard: factored slower at batch 1 on CPU (1.16 vs 1 ms)")
    assert guard_verdict(within_noise, "CPUExecutionProvider") == ""
    assert guard_verdict(within_noise, "CPUExecutionProvider", margin=0.05) == (
        "latency guard: factored not 5% faster at batch 1 on CPU (0.97 vs 1 ms)")
    assert guard_verdict([LayerTiming(1, 1, 1.0, 1.0)], "CPUExecutionProvider") == (
        "latency guard: factored not 0% faster at batch 1 on CPU (1 vs 1 ms)")


def test_guard_settings_are_validated() -> None:
    with pytest.raises(InvalidInputError, match="guard batch sizes must be positive"):
        LatencyGuard(batches=(0,))
    with pytest.raises(InvalidInputError, match="guard margin must be in"):
        LatencyGuard(margin=1.0)


def test_activation_rows_count_inner_dims() -> None:
    (layer,), _ = find_layers(ir.from_proto(make_linear_model(op="MatMul", x_shape=("batch", "seq", 32))))
    assert activation_rows(layer, 4, {"seq": 16}) == 64 and activation_rows(layer, 4, {}) == 4


def test_guard_micro_models_compute_the_layer() -> None:
    """The timed models are the real layer: at full rank both give the original node's output."""
    model = make_linear_model(op="Gemm", trans_b=True, alpha=0.5, beta=2.0, bias="1n")
    (layer,), _ = find_layers(ir.from_proto(model))
    w = random_weight(32, 24, decay=0.05).astype(np.float32)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    dense, factored = _layer_models(layer, u * s, vt)
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    expected = make_session(model.SerializeToString()).run(None, {"X": x})[0]
    for micro in (dense, factored):
        np.testing.assert_allclose(make_session(micro).run(None, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def test_guard_keeps_the_decision_its_measurements_support(tmp_path: Path) -> None:
    """A rank just under break-even (measured 1.16x slower at batch 1): whatever this run measures,
    the layer is factored exactly when its own timings say factoring is faster by the margin."""
    model = make_linear_model(256, 256, op="MatMul", x_shape=("batch", 256))
    path = tmp_path / "layer.onnx"
    onnx.save(model, path)
    guard = LatencyGuard(batches=(1, 8), layer_seconds=0.05, model_seconds=0.05)
    _, report = compress(path, tmp_path / "out.onnx", policy=FixedRankPolicy(127), max_rank_fraction=1.0,
                         guard=guard, check=False)
    (decision,) = report.layers
    assert [t.batch for t in decision.timings] == [1, 8]
    assert decision.factored == (guard_verdict(decision.timings, "CPUExecutionProvider") == "")
    assert decision.factored == (report.factored == 1)
    assert [c.batch for c in report.latency_check] == ([1, 8] if decision.factored else [])
    slower = [c for c in report.latency_check if c.consistently_slower]
    assert len([n for n in report.notes if "SLOWER" in n]) == len(slower)


def test_cli_bench_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original, small = _pair(tmp_path)
    assert main(["bench", str(original), str(small), "--batch", "1,2", "--seconds", "0.01", "--no-memory",
                 "--json", "--report", str(tmp_path / "bench.md"), "-q"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["batch"] for c in data["latency"]] == [1, 2] and data["memory"]["original"]["peak_rss_bytes"] is None
    assert (tmp_path / "bench.md").read_text().count("| CPU") == 2


@pytest.mark.parametrize(("options", "message"), [
    (["--batch", "0"], "--batch expects positive integers"),
    (["--batch", "a,b"], "--batch expects positive integers"),
    (["--providers", "nonesuch"], "no requested execution provider can run here"),
])
def test_cli_bench_bad_options(options: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original, small = _pair(tmp_path)
    assert main(["bench", str(original), str(small), *options, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present")
def test_cli_guard_on_absent_target_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original, _ = _pair(tmp_path)
    out = tmp_path / "guarded.onnx"
    assert main(["compress", str(original), "-o", str(out), "--guard", "latency", "--target", "cuda", "-q"]) == 2
    assert "--target cuda:" in capsys.readouterr().err and not out.exists()
