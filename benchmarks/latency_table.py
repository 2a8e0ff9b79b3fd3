"""Measured latency ratio against the multiply-add limit, memory and accuracy, with and without the guard.

For each case (a real model and a policy), compress twice, without and with ``--guard latency`` on
the CPU at batch 1 and 32, then benchmark each result against the original with
``onnx_arsvd.measure.benchmark.benchmark_models``: interleaved runs, medians, per-pair ratios (p10-p90),
a fresh process per model for memory. One case sits deliberately near break-even (ranks ~0.9-1.0 x
m*n/(m+n)), where factoring is expected to be slower: the guard must not ship that.

Usage: python -m benchmarks.latency_table [--seconds 2] [--threads 0] [--quick] [--out benchmarks/results/latency.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import header, write_result
from onnx_arsvd import EnergyPolicy, RatioPolicy, compress
from onnx_arsvd.config import LatencyGuard
from onnx_arsvd.measure.benchmark import benchmark_models
from onnx_arsvd.measure.guard import LatencyTable
from onnx_arsvd.measure.results import BenchmarkResult
from onnx_arsvd.numerics.rank import RankPolicy

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latency.md"
BATCHES = (1, 32)


@dataclass(frozen=True)
class Case:
    """One model and one policy; ``data`` gives labels for accuracy, else generated inputs are compared."""

    model: Path
    policy: RankPolicy
    data: Path | None = None
    dims: dict[str, int] = field(default_factory=dict)
    max_rank_fraction: float = 0.8
    label: str = ""


def cases() -> list[Case]:
    fashion, digits = MODELS / "fashion_mlp.onnx", MODELS / "digits_mlp.onnx"
    found = [
        Case(fashion, EnergyPolicy(0.9), MODELS / "fashion_test.npz"),
        Case(digits, EnergyPolicy(0.8), MODELS / "digits_test.npz"),
        Case(fashion, RatioPolicy(0.6), MODELS / "fashion_test.npz", max_rank_fraction=1.0,
             label="near break-even (ranks 0.99 / 0.90 x break-even)"),
    ]
    minilm = MODELS / "build" / "minilm.onnx"
    if minilm.exists():
        found.append(Case(minilm, EnergyPolicy(0.8), dims={"seq": 128}))
    else:
        print(f"{minilm} missing (python models/build_minilm.py): MiniLM skipped", file=sys.stderr)
    return found


def _ratio(result: BenchmarkResult, batch: int) -> str:
    (c,) = [c for c in result.latency if c.batch == batch]
    rounds = ", ".join(f"{r:.2f}" for r in c.round_ratios)
    return (f"{c.ratio:.3f} [{c.ratio_p10:.2f}, {c.ratio_p90:.2f}] ({rounds})"
            + (" **slower**" if c.consistently_slower else ""))


def _quality(result: BenchmarkResult) -> str:
    verification = next(iter(result.accuracy.values()))
    if verification.accuracy_drop is not None:
        return f"{100 * verification.original.accuracy:.2f}% -> {100 * verification.compressed.accuracy:.2f}%"
    return f"cosine {verification.outputs[0].mean_cosine:.4f}"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def row(case: Case, guarded: bool, report, result: BenchmarkResult) -> str:
    memory = result.memory
    cells = [
        case.model.name, case.label or case.policy.describe(), "on" if guarded else "off",
        f"{report.factored}/{len(report.layers)}", f"{result.dense_flop_ratio:.3f}",
        *(_ratio(result, b) for b in BATCHES),
        f"{memory['compressed'].file_bytes / memory['original'].file_bytes:.3f}",
        f"{_mib(memory['original'].rss_increase_bytes)} -> {_mib(memory['compressed'].rss_increase_bytes)}",
        _quality(result),
    ]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum measuring time per batch size")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: onnxruntime's default)")
    parser.add_argument("--quick", action="store_true", help="short measurements, for checking the script")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    seconds = 0.1 if args.quick else args.seconds
    table = LatencyTable(LatencyGuard(target="cpu", batches=BATCHES, threads=args.threads,
                                      layer_seconds=0.05 if args.quick else 0.3, model_seconds=seconds))
    headers = ["model", "policy", "guard", "factored", "limit (MAC ratio)", "latency ratio b1 [p10, p90]",
               "latency ratio b32 [p10, p90]", "file ratio", "RSS increase MiB", "accuracy / output cosine"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * 4 + ["---:"] * 6) + "|"]
    with tempfile.TemporaryDirectory(prefix="latency_table_") as tmp:
        for index, case in enumerate(cases()):
            for guarded in (False, True):
                out = Path(tmp) / f"case{index}_{guarded}.onnx"
                _, report = compress(case.model, out, policy=case.policy, max_rank_fraction=case.max_rank_fraction,
                                     latency_table=table if guarded else None, dims=case.dims, check=False,
                                     factor_heads=True)
                result = benchmark_models(case.model, out, batches=BATCHES, providers=["cpu"], threads=args.threads,
                                          dims=case.dims, min_seconds=seconds, accuracy_data=case.data)
                lines.append(row(case, guarded, report, result))
                print(lines[-1], flush=True)
    text = "\n".join([
        *header("Latency, memory and accuracy on the CPU, with and without the latency guard", __file__, argv, notes=[
            f"CPU execution provider, intra-op threads {args.threads or 'default'}, spinning off; two sessions live,"
            f" runs interleaved pairwise for >= {seconds:g} s per batch size in all; ratio = compressed / original"
            " per pair",
            "each ratio cell: median of the per-pair ratios [p10, p90] (median of each of 3 rounds with fresh"
            " sessions); **slower**: slower overall and in every round. Two sessions of one unchanged file differ by"
            " up to ~5% at batch 1, so smaller differences are not resolved",
            "limit = multiply-adds of the dense layers, compressed / original: the best ratio the factoring alone"
            " can give",
            "RSS increase: resident memory a fresh process gains loading and running the model (batch 32)",
            "MiniLM at sequence length 128; its quality is the cosine of last_hidden_state on generated token ids"]),
        "",
        *lines,
    ]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
