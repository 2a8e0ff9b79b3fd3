"""Benchmark statistics, provider discovery, the memory probe, the report, and the latency guard.

No test asserts a wall-clock time: timings are only checked for shape and internal consistency.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnx_arsvd import FixedRankPolicy, compress
from onnx_arsvd.cli.main import main
from onnx_arsvd.config import LatencyGuard
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.benchmark import (
    LatencyComparison,
    benchmark_models,
    compare_latency,
    dense_flop_ratio,
    discover_providers,
    interleaved_times,
    latency_stats,
    measure_memory,
    timed_rounds,
)
from onnx_arsvd.measure.guard import (
    LatencyTable,
    _layer_models,
    activation_rows,
    guard_verdict,
    observed_rows,
    regressions,
)
from onnx_arsvd.measure.results import LayerTiming
from onnx_arsvd.measure.verification import make_session
from onnx_arsvd.report.bench_report import benchmark_to_json, format_benchmark, plot_benchmark
from tests.conftest import MODELS, initializer_names, make_linear_model, make_mlp, random_weight, run

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
    result = compare_latency("CPUExecutionProvider", 1,
                             [(original[:3], compressed[:3]), (original[3:], compressed[3:])])
    assert result.ratio == 0.5
    assert result.ratio_p10 == pytest.approx(np.percentile([0.5, 0.5, 0.5, 1.0, 0.1], 10))
    assert result.ratio_p90 == pytest.approx(np.percentile([0.5, 0.5, 0.5, 1.0, 0.1], 90))
    assert result.round_ratios == (0.5, pytest.approx(0.55))
    assert result.original.runs == 5 and not result.consistently_slower


def test_slower_only_when_every_round_agrees() -> None:
    base = np.ones(10)
    two_of_three = compare_latency("CPUExecutionProvider", 1,
                                   [(base, base * 1.1), (base, base * 1.1), (base, base * 0.95)])
    every_round = compare_latency("CPUExecutionProvider", 1,
                                  [(base, base * 1.1), (base, base * 1.02), (base, base * 1.05)])
    single_round = compare_latency("CPUExecutionProvider", 1, [(base, base * 1.5)])
    assert two_of_three.ratio > 1.0 and not two_of_three.consistently_slower
    assert every_round.consistently_slower
    assert not single_round.consistently_slower  # one pair of sessions cannot tell session noise apart


def _comparison(batch: int, round_ratios: tuple[float, ...]) -> LatencyComparison:
    """A whole-model comparison whose rounds have exactly these compressed/original ratios (constructed, not timed)."""
    original = np.full(9, 1e-3)
    return compare_latency("CPUExecutionProvider", batch, [(original, original * r) for r in round_ratios])


def test_whole_model_check_warns_only_where_every_round_is_slower() -> None:
    comparisons = [
        _comparison(1, (1.2, 1.05, 1.1)),  # slower in every round
        _comparison(8, (1.2, 1.3, 0.99)),  # slower overall, but one round disagrees
        _comparison(32, (0.8, 0.9, 0.7)),  # faster
        _comparison(64, (1.5,)),  # one round cannot tell session noise apart
        _comparison(128, (1.2, 1.0, 1.1)),  # a round with no difference is not a slower round
    ]
    assert [c.consistently_slower for c in comparisons] == [True, False, False, False, False]
    (warning,) = regressions(comparisons)
    assert warning.startswith("the compressed model is SLOWER than the original at batch 1 on CPU: ")
    assert "median 1.1 ms vs 1 ms (ratio 1.100; per round 1.200, 1.050, 1.100)" in warning
    assert regressions(comparisons[1:]) == []


class _SessionLog:
    """Records each onnxruntime session created (with its model) and each run, in order.

    The real ``InferenceSession`` methods still do the work: this only watches which sessions exist and which one runs.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.created: list[tuple[ort.InferenceSession, object]] = []
        self.runs: list[tuple[ort.InferenceSession, int]] = []  # each run's session, and how many existed then
        real_init, real_run = ort.InferenceSession.__init__, ort.InferenceSession.run

        def init(session: ort.InferenceSession, path_or_bytes: object, *args: object, **kwargs: object) -> None:
            real_init(session, path_or_bytes, *args, **kwargs)
            self.created.append((session, path_or_bytes))

        def run(session: ort.InferenceSession, *args: object, **kwargs: object) -> object:
            self.runs.append((session, len(self.created)))
            return real_run(session, *args, **kwargs)

        monkeypatch.setattr(ort.InferenceSession, "__init__", init)
        monkeypatch.setattr(ort.InferenceSession, "run", run)


def test_each_round_times_its_own_fresh_pair_of_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    original, compressed = make_mlp(seed=0).SerializeToString(), make_mlp(seed=1).SerializeToString()
    log = _SessionLog(monkeypatch)
    rounds = timed_rounds(original, compressed, {"X": np.ones((2, 48), np.float32)}, rounds=3, min_seconds=0.0,
                          min_runs=4)
    assert len(rounds) == 3 and all(len(a) == len(b) == 4 for a, b in rounds)
    sessions = [session for session, _ in log.created]
    assert len({id(s) for s in sessions}) == 6  # two new sessions per round, none reused
    # creation order alternates between rounds, so neither model always gets the first allocation
    assert [model for _, model in log.created] == [original, compressed, compressed, original, original, compressed]
    for session, existing in log.runs:  # a round runs only the two sessions just created for it
        assert existing % 2 == 0 and session in sessions[existing - 2 : existing]
    ran = [session for session, _ in log.runs]
    assert [ran.count(s) for s in sessions] == [5 + 4] * 6  # warm-up and timed runs, the same for each


def test_one_at_a_time_rounds_hold_one_session_and_alternate_the_order(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """For models too big to hold twice: every session opens with no other alive, each model is timed alone,
    and the order alternates between rounds; ``bench`` says how it timed."""
    import weakref

    import onnx_arsvd.measure.benchmark as benchmark

    original, compressed = make_mlp(seed=0).SerializeToString(), make_mlp(seed=1).SerializeToString()
    opened: list[tuple[object, int]] = []
    refs: list[weakref.ref] = []
    real = benchmark.make_session

    def tracked(source: object, *args: object, **kwargs: object) -> ort.InferenceSession:
        alive = sum(ref() is not None for ref in refs)
        session = real(source, *args, **kwargs)
        refs.append(weakref.ref(session))
        opened.append((source, alive))
        return session

    monkeypatch.setattr(benchmark, "make_session", tracked)
    rounds = timed_rounds(original, compressed, {"X": np.ones((2, 48), np.float32)}, rounds=3, min_seconds=0.0,
                          min_runs=4, one_at_a_time=True)
    assert len(rounds) == 3 and all(len(a) == len(b) == 4 for a, b in rounds)
    assert [source for source, _ in opened] == [original, compressed, compressed, original, original, compressed]
    assert [alive for _, alive in opened] == [0] * 6
    paths = []
    for name, proto in (("a.onnx", make_mlp(seed=0)), ("b.onnx", make_mlp(seed=1))):
        onnx.save(proto, tmp_path / name)
        paths.append(tmp_path / name)
    result = benchmark_models(*paths, batches=(2,), min_seconds=0.0, memory=False, providers=["cpu"],
                              one_at_a_time=True)
    assert len(result.latency) == 1 and any("each model timed alone in turn" in note for note in result.notes)


def test_interleaved_times_alternate_who_runs_first(monkeypatch: pytest.MonkeyPatch) -> None:
    first = make_session(make_mlp(seed=0).SerializeToString())
    second = make_session(make_mlp(seed=1).SerializeToString())
    log = _SessionLog(monkeypatch)
    times = interleaved_times(first, second, {"X": np.ones((2, 48), np.float32)}, warmup=2, min_runs=5,
                              min_seconds=0.0)
    order = "".join("A" if session is first else "B" for session, _ in log.runs)
    assert order == "ABAB" + "AB" "BA" "AB" "BA" "AB"  # warm-up, then five pairs, each session first in turn
    assert len(times[0]) == len(times[1]) == 5 and np.all(times[0] > 0) and np.all(times[1] > 0)


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
    compress(original, small, policy=FixedRankPolicy(4), min_params=0, check=False, factor_heads=True)
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
    assert guard_verdict(faster, "CPUExecutionProvider", 0.0) == ""
    assert guard_verdict(slower_at_one, "CPUExecutionProvider", 0.0) == (
        "latency guard: factored slower at batch 1 on CPU (1.16 vs 1 ms)")
    assert guard_verdict(within_noise, "CPUExecutionProvider", 0.0) == ""
    assert guard_verdict(within_noise, "CPUExecutionProvider", margin=0.05) == (
        "latency guard: factored not 5% faster at batch 1 on CPU (0.97 vs 1 ms)")
    assert guard_verdict([LayerTiming(1, 1, 1.0, 1.0)], "CPUExecutionProvider", 0.0) == (
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


def test_guard_keeps_dense_a_layer_not_faster_by_its_margin(tmp_path: Path) -> None:
    """Rank 16 of a 512 x 512 weight does 16x fewer multiply-adds: clearly faster, but never 100x faster.

    With margin 0.99 the guard must keep it dense whatever this run measures (with margin 0 it would factor it).
    """
    model = make_linear_model(512, 512, op="MatMul", x_shape=("batch", 512))
    path = tmp_path / "layer.onnx"
    onnx.save(model, path)
    guard = LatencyGuard(batches=(1, 8), margin=0.99, layer_seconds=0.05, model_seconds=0.05)
    _, report = compress(path, tmp_path / "out.onnx", policy=FixedRankPolicy(16), guard=guard, check=False,
                         factor_heads=True)
    (decision,) = report.layers
    assert not decision.factored and report.factored == 0
    assert [(t.batch, t.rows) for t in decision.timings] == [(1, 1), (8, 8)]
    assert re.fullmatch(r"latency guard: factored (slower|not 99% faster) at batch (1|8) on CPU \(.+ ms\)",
                        decision.reason)
    assert report.latency_check == []  # nothing was factored, so the whole models are not timed
    saved = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in saved.graph.node] == ["MatMul"] and initializer_names(saved) == {"W"}
    x = {"X": np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)}
    np.testing.assert_array_equal(run(saved, x)[0], run(model, x)[0])


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
def test_cli_bench_bad_options(options: list[str], message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    original, small = _pair(tmp_path)
    assert main(["bench", str(original), str(small), *options, "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present")
def test_cli_guard_on_absent_target_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original, _ = _pair(tmp_path)
    out = tmp_path / "guarded.onnx"
    assert main(["compress", str(original), "-o", str(out), "--guard", "latency", "--target", "cuda", "-q"]) == 2
    assert "guard target 'cuda':" in capsys.readouterr().err and not out.exists()


def test_interleaved_times_stop_at_max_seconds_with_at_least_three_pairs(tmp_path: Path) -> None:
    """A slow model's timing is bounded: past max_seconds only the 3-pair minimum is taken."""
    path = tmp_path / "mlp.onnx"
    onnx.save(make_mlp(), path)
    session = make_session(path)
    feed = {"X": np.zeros((2, 48), np.float32)}
    first, second = interleaved_times(session, session, feed, warmup=0, min_runs=1000, max_seconds=0.0)
    assert len(first) == len(second) == 3


def test_guard_observes_the_rows_a_layer_really_multiplies() -> None:
    """A MatMul on a (batch, seq, 48) activation whose seq is symbolic multiplies seq rows per sample;
    the graph's shapes alone would time it at one row per sample."""
    model = ir.from_proto(make_linear_model(48, 40, op="MatMul", x_shape=("batch", "seq", 48)))
    layers, _ = find_layers(model)
    feed = {"X": np.zeros((3, 7, 48), np.float32)}
    rows = observed_rows(model, layers, feed)
    assert rows == {id(layers[0].node): 7.0}
    assert activation_rows(layers[0], 3, {}) == 3  # what the symbolic shape gives without observation


def test_guard_times_each_shape_and_rank_once_and_shares_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The latency table: layers with the same shape, rank and rows share one measurement; a new shape or rank
    is timed; a second run given the same table looks everything up."""
    from onnx_arsvd.measure import guard as guard_module

    calls: list[tuple[int, int]] = []
    real = guard_module.time_layer

    def counting(layer, factors, **options):  # type: ignore[no-untyped-def]
        calls.append((layer.shape[0], factors[0].shape[1]))
        return real(layer, factors, **options)

    monkeypatch.setattr(guard_module, "time_layer", counting)
    model = make_mlp((256, 256, 256, 256, 128))  # three 256 x 256 layers, then 256 x 128
    guard = LatencyTable(LatencyGuard(batches=(1,), layer_seconds=0.01, model_seconds=0.01))  # kept across runs
    _, report = compress(model, policy=FixedRankPolicy(16), latency_table=guard, check=False, min_params=0,
                         factor_heads=True)
    assert sorted(calls) == [(256, 16), (256, 16)]  # one per distinct shape (256x256 and 256x128)
    timed = [d for d in report.layers if d.timings]
    assert len(timed) == 4
    same_shape = [d.timings for d in timed if d.shape == (256, 256)]
    assert len(same_shape) == 3 and same_shape[0] == same_shape[1] == same_shape[2]
    compress(model, policy=FixedRankPolicy(16), latency_table=guard, check=False, min_params=0,
             factor_heads=True)
    assert len(calls) == 2  # all looked up
    compress(model, policy=FixedRankPolicy(8), latency_table=guard, check=False, min_params=0,
             factor_heads=True)
    assert len(calls) == 4  # another rank: timed again


def test_a_ratio_whose_rounds_straddle_one_or_spread_past_the_effect_is_not_resolved() -> None:
    assert _comparison(1, (0.5, 0.55, 0.52)).resolved  # faster in every round, tight
    assert not _comparison(1, (0.6, 1.4, 0.83)).resolved  # the same file against itself: rounds straddle 1
    assert not _comparison(1, (0.7, 0.98, 0.9)).resolved  # all faster, but spread 0.28 against an effect of 0.1
    assert not _comparison(1, (0.8,)).resolved  # one round cannot tell


def test_a_quantized_model_has_no_multiply_add_limit_and_compress_bench_verifies_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q.onnx"
    assert main(["compress", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--tau", "0.9", "--quantize", "int8",
                 "--bench", "--batch", "1", "--seconds", "0.05", "--no-memory", "--data",
                 str(MODELS / "digits_test.npz"), "-q"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("verification on CPUExecutionProvider") == 1
    assert "limit: none, the compressed model has quantized layers" in printed
    assert dense_flop_ratio(ir.load(MODELS / "digits_mlp.onnx"), ir.load(out)) is None


def test_the_peak_memory_probe_works_without_proc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where there is no /proc (macOS, Windows) the peak comes from the platform's own counter: at least the resident
    set now, and not beyond the machine's memory."""
    import psutil

    from onnx_arsvd.measure import memory_probe

    with_proc = memory_probe.peak_resident()
    monkeypatch.setattr(memory_probe, "_STATUS", tmp_path / "no-proc" / "status")
    without = memory_probe.peak_resident()
    current = memory_probe.resident()
    assert current <= without <= psutil.virtual_memory().total
    assert 0.5 < without / with_proc < 2.0  # the same peak counted two ways (ru_maxrss is never reset)
