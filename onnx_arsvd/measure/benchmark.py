"""Latency and memory of an original and a compressed model on every available execution provider.

Latency: after a warm-up, the two sessions run the same feed interleaved (A B, B A, A B, ...) so
machine drift hits both alike; the ratio's spread comes from the per-pair ratios. This is repeated in
rounds with fresh sessions, because two sessions of one and the same file differ by several percent
(benchmarks/session_noise.py: up to 8% at batch 1 on a 0.1 ms model): a difference is only real if
every round shows it.
Both sessions are live at once, so intra-op thread spinning is turned off (idle spinning threads of
one session slow the other badly). Memory: each model is loaded and run in a fresh child process
(:mod:`onnx_arsvd.measure.memory_probe`), so the two never share a heap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from onnx_arsvd.errors import InvalidInputError, OutputError, UnsupportedModelError
from onnx_arsvd.graph.layers import QUANTIZED_OPS, find_layers
from onnx_arsvd.io.calls import is_per_call, read_calls
from onnx_arsvd.io.data import Feed, input_specs, load_data
from onnx_arsvd.io.models import load_model, model_file_bytes, weight_stats
from onnx_arsvd.measure.inputs import dims_from_data, generated_batches, unset_dims
from onnx_arsvd.measure.results import BenchmarkResult, LatencyComparison, LatencyStats, MemoryStats
from onnx_arsvd.measure.sessions import ModelSource, make_session
from onnx_arsvd.measure.verification import too_big_together, verify
from onnx_arsvd.progress import progress_bar

__all__ = [
    "BenchmarkResult",
    "LatencyComparison",
    "LatencyStats",
    "MemoryStats",
    "benchmark_models",
    "dense_flop_ratio",
    "discover_providers",
    "interleaved_times",
    "latency_stats",
    "timed_rounds",
    "measure_memory",
]

PROVIDER_ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                    "tensorrt": "TensorrtExecutionProvider"}
_NOT_COMPUTE = frozenset({"AzureExecutionProvider"})  # remote-call provider: no local kernels to time


def _resolve(name: str) -> str:
    return PROVIDER_ALIASES.get(name.lower(), name)


def discover_providers(requested: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
    """Providers that really run here (a session on a tiny model keeps them), and notes on those that don't.

    ``requested`` names providers (``cpu``, ``cuda``, ``tensorrt`` or full names); None means every
    provider onnxruntime offers. onnxruntime-gpu lists CUDA even without a GPU and then silently
    falls back to the CPU, which is why each candidate is tried.
    """
    available = [p for p in ort.get_available_providers() if p not in _NOT_COMPUTE]
    wanted = [_resolve(p) for p in requested] if requested else available
    usable: list[str] = []
    notes: list[str] = []
    probe = _identity_model()
    for provider in dict.fromkeys(wanted):
        if provider not in ort.get_all_providers():
            notes.append(f"{provider} skipped: unknown provider (onnxruntime knows {', '.join(_known_names())})")
            continue
        if provider not in available:
            notes.append(f"{provider} skipped: not offered by this onnxruntime build ({ort.__version__})")
            continue
        try:
            actual = make_session(probe, provider).get_providers()[0]
        except UnsupportedModelError as error:  # a missing driver or library
            notes.append(f"{provider} skipped: {error}")
            continue
        if actual != provider:
            notes.append(f"{provider} skipped: fell back to {actual}")
            continue
        usable.append(provider)
    if not usable:
        raise InvalidInputError("no requested execution provider can run here; " + "; ".join(notes))
    return usable, notes


def _known_names() -> list[str]:
    """Short names of the providers onnxruntime knows, and the aliases accepted here."""
    aliases = {full: short for short, full in PROVIDER_ALIASES.items()}
    return [aliases.get(p, p) for p in ort.get_all_providers() if p not in _NOT_COMPUTE]


def _identity_model() -> bytes:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    node = ir.Node("", "Identity", [x], num_outputs=1)
    node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = "y", x.type, x.shape
    graph = ir.Graph([x], node.outputs, nodes=[node], opset_imports={"": 17})
    return ir.to_proto(ir.Model(graph, ir_version=8)).SerializeToString()


def interleaved_times(
    first: ort.InferenceSession,
    second: ort.InferenceSession,
    feed: Feed,
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 2000,
    min_seconds: float = 1.0,
    max_seconds: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per call of each session, measured in alternating pairs until enough time has passed.

    ``max_seconds`` bounds a slow model's measurement: past it, no more than 3 pairs are taken.
    """
    first_times, second_times = _times((first, second), feed, warmup=warmup, min_runs=min_runs, max_runs=max_runs,
                                       min_seconds=min_seconds, max_seconds=max_seconds)
    return first_times, second_times


def _times(sessions: Sequence[ort.InferenceSession], feed: Feed, *, warmup: int, min_runs: int, max_runs: int,
           min_seconds: float, max_seconds: float | None) -> list[np.ndarray]:
    """Seconds per call of each session, one call of each per turn (their order reversed every other turn)."""
    for _ in range(warmup):
        for session in sessions:
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in sessions]
    started = time.perf_counter()
    turn = 0

    def more() -> bool:
        elapsed = time.perf_counter() - started
        if max_seconds is not None and elapsed > max_seconds and turn >= 3:
            return False
        return turn < min_runs or (turn < max_runs and elapsed < min_seconds)

    while more():
        order = range(len(sessions)) if turn % 2 == 0 else reversed(range(len(sessions)))  # neither always warm
        for index in order:
            tick = time.perf_counter()
            sessions[index].run(None, feed)
            times[index].append(time.perf_counter() - tick)
        turn += 1
    return [np.asarray(seconds) for seconds in times]


def timed_rounds(
    original: ModelSource,
    compressed: ModelSource,
    feed: Feed,
    *,
    provider: str = "CPUExecutionProvider",
    threads: int = 0,
    rounds: int = 3,
    min_seconds: float = 1.0,
    min_runs: int = 20,
    max_seconds: float | None = None,
    one_at_a_time: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Interleaved times of both models in ``rounds`` rounds, each with freshly created sessions.

    Creation order alternates between rounds; ``min_seconds`` and ``max_seconds`` are totals over all rounds.
    ``one_at_a_time`` holds one session at a time: in each round one model is timed alone, then the other,
    the order alternating between rounds (blocks of runs interleave, not single runs).
    """
    results = []
    for index in range(rounds):
        if one_at_a_time:
            timed = {}
            for name in (("compressed", "original") if index % 2 else ("original", "compressed")):
                session = make_session(original if name == "original" else compressed, provider, threads)
                timed[name] = _times((session,), feed, warmup=5, min_runs=min_runs, max_runs=2000,
                                     min_seconds=min_seconds / rounds / 2,
                                     max_seconds=None if max_seconds is None else max_seconds / rounds / 2)[0]
                del session
            results.append((timed["original"], timed["compressed"]))
            continue
        if index % 2:
            second = make_session(compressed, provider, threads)
            first = make_session(original, provider, threads)
        else:
            first = make_session(original, provider, threads)
            second = make_session(compressed, provider, threads)
        results.append(interleaved_times(first, second, feed, min_runs=min_runs, min_seconds=min_seconds / rounds,
                                         max_seconds=None if max_seconds is None else max_seconds / rounds))
        del first, second
    return results


def latency_stats(seconds: np.ndarray, batch: int) -> LatencyStats:
    """Median, p90, p99 in milliseconds and samples per second at the median."""
    median = float(np.median(seconds))
    return LatencyStats(
        median_ms=1e3 * median,
        p90_ms=1e3 * float(np.percentile(seconds, 90)),
        p99_ms=1e3 * float(np.percentile(seconds, 99)),
        throughput=batch / median if median > 0 else float("inf"),
        runs=len(seconds),
    )


def compare_latency(provider: str, batch: int, rounds: Sequence[tuple[np.ndarray, np.ndarray]]) -> LatencyComparison:
    """Pooled stats of both models, the ratio from the per-pair ratios, and each round's median ratio."""
    original = np.concatenate([a for a, _ in rounds])
    compressed = np.concatenate([b for _, b in rounds])
    ratios = compressed / original
    return LatencyComparison(
        provider=provider,
        batch=batch,
        original=latency_stats(original, batch),
        compressed=latency_stats(compressed, batch),
        ratio=float(np.median(ratios)),
        ratio_p10=float(np.percentile(ratios, 10)),
        ratio_p90=float(np.percentile(ratios, 90)),
        round_ratios=tuple(float(np.median(b / a)) for a, b in rounds),
    )


def dense_flop_ratio(original: ir.Model, compressed: ir.Model) -> float | None:
    """Multiply-adds per row of all constant-weight MatMul/Gemm layers, compressed / original; None when the
    compressed model has quantized layers (integer and 4-bit multiply-adds are not float ones: no such limit).

    A factored layer contributes k(m+n) where it had m*n: this is the best latency ratio the dense
    layers alone can give, the limit that measured ratios are compared with.
    """
    if any(node.op_type in QUANTIZED_OPS for node in compressed.graph.all_nodes()):
        return None

    def macs(model: ir.Model) -> int:
        return sum(layer.shape[0] * layer.shape[1] for layer in find_layers(model)[0] if not layer.is_embedding)

    before = macs(original)
    return macs(compressed) / before if before else 1.0


def batch_feed(session: ort.InferenceSession, model: ir.Model, batch: int, dims: Mapping[str, int],
               seed: int = 0) -> Feed:
    """One generated feed whose dynamic first dims are ``batch``; fixed dims are respected."""
    batch_dims = {str(arg.shape[0]): batch for arg in session.get_inputs()
                  if arg.shape and not isinstance(arg.shape[0], int)}
    return generated_batches(session, model, {**dims, **batch_dims}, samples=1, seed=seed)[0]


def measure_memory(model_path: str | os.PathLike, provider: str, feed: Feed,
                   threads: int = 0) -> tuple[int, int | None]:
    """(peak RSS, its increase over the process before the session) of a fresh process running ``model_path``.

    The increase is None where the kernel would not reset the high-water mark (it would then include
    the onnxruntime import's own peak).
    """
    with tempfile.TemporaryDirectory(prefix="onnx-arsvd-memory-") as folder:
        feed_path = Path(folder) / "feed.npz"
        try:
            np.savez(feed_path, **feed)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
        except OSError as error:
            raise OutputError(f"{folder}: cannot write the memory probe's input in the temporary folder "
                              f"({error.strerror or error}); free space there or set TMPDIR") from error
        command = [sys.executable, "-m", "onnx_arsvd.measure.memory_probe", os.fspath(model_path), provider,
                   str(feed_path), str(threads)]
        completed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["no output"])[-1]
        raise UnsupportedModelError(f"memory probe failed for {model_path}: {last}")
    numbers = json.loads(completed.stdout.strip().splitlines()[-1])
    return numbers["peak"], (numbers["peak"] - numbers["baseline"]) if numbers["peak_reset"] else None


def benchmark_models(
    original: str | os.PathLike,
    compressed: str | os.PathLike,
    *,
    batches: Sequence[int] = (1, 32),
    providers: Sequence[str] | None = None,
    threads: int = 0,
    dims: Mapping[str, int] | None = None,
    min_seconds: float = 1.0,
    memory: bool = True,
    accuracy_data: str | os.PathLike | None = None,
    progress: bool = False,
    one_at_a_time: bool | None = None,
    verified_on: Sequence[str] = (),
) -> BenchmarkResult:
    """Latency at each batch size and provider, memory of each model, and accuracy on each provider but those in
    ``verified_on`` (a run that verified there already: one verification per provider and run).

    ``one_at_a_time`` (as in :func:`~onnx_arsvd.measure.verification.verify`; ``None`` chooses it when both models'
    weights exceed half the memory available) holds one session at a time, for the timing and the accuracy.
    """
    if not batches or any(b < 1 for b in batches):
        raise InvalidInputError(f"batch sizes must be positive integers, got {list(batches)}")
    dims = dict(dims or {})
    paths = {"original": Path(original), "compressed": Path(compressed)}
    models = {name: load_model(path) for name, path in paths.items()}
    usable, notes = discover_providers(providers)
    if one_at_a_time is None:
        one_at_a_time = too_big_together(*(weight_stats(model)[1] for model in models.values()))
    interleaving = ("each model timed alone in turn (one session at a time), the order alternating between rounds"
                    if one_at_a_time else "runs interleaved pairwise")
    notes.append(f"sessions: intra-op threads {threads or 'onnxruntime default'}, thread spinning off; "
                 f"3 rounds of fresh sessions per batch size, {interleaving}, at least {min_seconds:g} s in all")
    probe = make_session(paths["original"])
    if accuracy_data is not None:  # time at the shapes the data has, where the user named none
        first = (read_calls(accuracy_data, input_specs(probe)).feeds[0] if is_per_call(accuracy_data)
                 else load_data(accuracy_data, probe)[0])
        dims = {**dims_from_data(probe, first), **dims}
    if unset := unset_dims(probe, dims):
        raise InvalidInputError(f"dynamic dims {', '.join(unset)} have no value to time at (a sequence of one token "
                                f"times a different model): give `dims` ({unset[0]}=N), or `data` to take them from")
    latency: list[LatencyComparison] = []
    input_shapes: dict[int, dict[str, list[int]]] = {}
    steps = [(p, b) for p in usable for b in batches]
    for provider, batch in progress_bar(steps, desc="latency", unit="case", progress=progress):
        feed = batch_feed(make_session(paths["original"], provider, threads), models["original"], batch, dims)
        actual = len(next(iter(feed.values()))) if feed else batch
        input_shapes[actual] = {name: list(array.shape) for name, array in feed.items()}
        if actual != batch:
            notes.append(f"batch {batch} asked, the model's fixed batch dim gives {actual}")
        rounds = timed_rounds(paths["original"], paths["compressed"], feed, provider=provider, threads=threads,
                              min_seconds=min_seconds, one_at_a_time=one_at_a_time)
        latency.append(compare_latency(provider, actual, rounds))
    accuracy = {provider: verify(paths["original"], paths["compressed"], data=accuracy_data, dims=dims, samples=8,
                                 provider=provider, one_at_a_time=one_at_a_time)
                for provider in usable if provider not in verified_on}
    memory_stats = {}
    for name, path in paths.items():
        params, nbytes = weight_stats(models[name])
        peak = increase = None
        if memory:  # resident memory is a host-side measure: always probed on the CPU provider
            feed = batch_feed(make_session(path), models[name], max(batches), dims)
            peak, increase = measure_memory(path, "CPUExecutionProvider", feed, threads)
        memory_stats[name] = MemoryStats(model_file_bytes(path), params, nbytes, peak, increase)
    return BenchmarkResult(threads=threads, providers=usable, models=(os.fspath(original), os.fspath(compressed)),
                           dense_flop_ratio=dense_flop_ratio(models["original"], models["compressed"]),
                           latency=latency, memory=memory_stats, accuracy=accuracy, notes=notes,
                           input_shapes=input_shapes)
