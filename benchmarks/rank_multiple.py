"""Which rank multiples do onnxruntime's CPU (MLAS) kernels prefer? Latency of X @ A @ B at every rank k.

For each weight shape (m, n) and row count (rows of X per call), a model X (rows x m) @ A (m x k) @ B (k x n)
is built for every k in a range, and all of them are timed round-robin, ``--rounds`` times, one thread
(so the load from other users of this machine hits every k alike); per k the median over rounds of
each round's median call time. Then, for each multiple q in 8, 16, 32, 64: for every k that is not a
multiple of q, the ratio t(ceil_q(k)) / t(k) (the cost in time of rounding k up to the next multiple).
A ratio at or below 1 means rounding up is free or faster: the kernel computes in blocks of q anyway.

Usage: python benchmarks/rank_multiple.py [--rounds 5] [--out benchmarks/results/rank_multiple.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks.results_io import package_versions, write_result

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "rank_multiple.md"
SHAPES = ((384, 1536), (1536, 384), (784, 512))
ROWS = (1, 128)
RANKS = range(33, 129)
MULTIPLES = (8, 16, 32, 64)


def _session(m: int, n: int, k: int, rng: np.random.Generator) -> ort.InferenceSession:
    a = numpy_helper.from_array(rng.standard_normal((m, k)).astype(np.float32), "A")
    b = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "A"], ["H"]), helper.make_node("MatMul", ["H", "B"], ["Y"])], "ab",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["rows", m])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["rows", n])], initializer=[a, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _call_ms(session: ort.InferenceSession, feed: dict, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def timings(m: int, n: int, rows: int, rounds: int) -> dict[int, float]:
    """Median ms per call for every rank in RANKS."""
    rng = np.random.default_rng(0)
    sessions = {k: _session(m, n, k, rng) for k in RANKS}
    feed = {"X": rng.standard_normal((rows, m)).astype(np.float32)}
    calls = 200 if rows == 1 else 20
    for session in sessions.values():
        _call_ms(session, feed, 3)
    per_round = {k: [] for k in RANKS}
    for _ in range(rounds):
        for k, session in sessions.items():
            per_round[k].append(_call_ms(session, feed, calls))
    return {k: float(np.median(v)) for k, v in per_round.items()}


def rounding_ratios(times: dict[int, float], q: int) -> tuple[np.ndarray, np.ndarray]:
    """For every k in range that is not a multiple of q, with u the next multiple: t(u) / t(k), and
    that divided by u / k (time per unit of rank at u relative to k; below 1 = the multiple is cheaper per rank)."""
    ratios, per_rank = [], []
    for k, t in times.items():
        up = -(-k // q) * q
        if k % q and up in times:
            ratios.append(times[up] / t)
            per_rank.append(times[up] / t / (up / k))
    return np.asarray(ratios), np.asarray(per_rank)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    load = os.getloadavg()
    lines = ["# Rank multiples on onnxruntime's CPU kernels", "",
             (f"- command: `python benchmarks/rank_multiple.py --rounds {args.rounds}`;"
              f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}"),
             f"- machine: {platform.platform()}, {os.cpu_count()} CPUs; {package_versions()}",
             (f"- one intra-op thread; load average at start {load[0]:.2f} (a shared machine: other users' jobs ran"
              " meanwhile, which the round-robin order spreads over every rank alike)"),
             (f"- ranks {RANKS.start}..{RANKS.stop - 1}; per rank the median over {args.rounds} rounds of the median"
              " call time; ratio = t(k rounded up to a multiple of q) / t(k), over the k that are not multiples of q"),
             ("- per-rank ratio = the ratio divided by u/k, u the rounded rank: time per unit of rank at the"
              " multiple relative to k (below 1: the multiple buys rank more cheaply than its neighbours)"),
             "", ("| shape (m x n) | rows | q | median ratio | p10 | p90 | share <= 1.00 | median per-rank ratio |"
                  " t(64) ms | t(65) ms | t(96) ms |"),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary: dict[int, list[float]] = {q: [] for q in MULTIPLES}
    per_rank_summary: dict[int, list[float]] = {q: [] for q in MULTIPLES}
    for m, n in SHAPES:
        for rows in ROWS:
            times = timings(m, n, rows, args.rounds)
            for q in MULTIPLES:
                ratios, per_rank = rounding_ratios(times, q)
                summary[q].append(float(np.median(ratios)))
                per_rank_summary[q].append(float(np.median(per_rank)))
                lines.append(f"| {m} x {n} | {rows} | {q} | {np.median(ratios):.3f} | {np.percentile(ratios, 10):.3f} |"
                             f" {np.percentile(ratios, 90):.3f} | {np.mean(ratios <= 1.0):.0%} |"
                             f" {np.median(per_rank):.3f} | {times[64]:.4f} | {times[65]:.4f} | {times[96]:.4f} |")
            print(f"{m}x{n} rows {rows} done at {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
    lines += ["", "Median over the shapes and row counts of the median ratio: "
              + ", ".join(f"q={q}: {np.median(v):.3f}" for q, v in summary.items())
              + "; of the per-rank ratio: "
              + ", ".join(f"q={q}: {np.median(v):.3f}" for q, v in per_rank_summary.items()),
              "", f"Wall time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.2f}."]
    write_result("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
