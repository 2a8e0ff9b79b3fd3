"""A benchmark result as a terminal table, Markdown, JSON and (with matplotlib) a PNG."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from importlib.metadata import version
from pathlib import Path

from tabulate import tabulate

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.measure.results import BenchmarkResult
from onnx_arsvd.report.model_report import format_verification, verification_to_dict

__all__ = ["benchmark_to_json", "format_benchmark", "plot_benchmark"]


def _short(provider: str) -> str:
    return provider.removesuffix("ExecutionProvider")


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f}"


def benchmark_to_json(result: BenchmarkResult) -> str:
    """The result as JSON, with the machine it ran on."""
    data = dataclasses.asdict(result)
    data["accuracy"] = {p: verification_to_dict(v) for p, v in result.accuracy.items()}
    data["machine"] = _machine()
    return json.dumps(data, indent=2)


def _machine() -> dict[str, object]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "onnxruntime": version("onnxruntime")}


def format_benchmark(result: BenchmarkResult, markdown: bool = False) -> str:
    """Latency per provider and batch with the limit beside it, memory, and accuracy per provider."""
    style = "github" if markdown else "simple"
    limit = result.dense_flop_ratio
    rows = [[_short(c.provider), c.batch, f"{c.original.median_ms:.4g}", f"{c.compressed.median_ms:.4g}",
             f"{c.original.p90_ms:.4g} / {c.original.p99_ms:.4g}",
             f"{c.compressed.p90_ms:.4g} / {c.compressed.p99_ms:.4g}",
             f"{c.compressed.throughput:,.0f}",
             f"{c.ratio:.3f} [{c.ratio_p10:.3f}, {c.ratio_p90:.3f}]" + ("" if c.resolved else " not resolved"),
             ", ".join(f"{r:.2f}" for r in c.round_ratios),
             "n/a" if limit is None else f"{limit:.3f}",
             f"{(1 - c.ratio) / (1 - limit):.0%}" if c.resolved and limit is not None and limit < 1 else "n/a"]
            for c in result.latency]
    headers = ["provider", "batch", "orig median ms", "comp median ms", "orig p90/p99", "comp p90/p99",
               "comp samples/s", "ratio comp/orig [p10, p90]", "per round", "limit", "of possible gain"]
    machine = _machine()
    shapes = "; ".join(f"batch {batch}: " + ", ".join(f"{name} {shape}" for name, shape in inputs.items())
                       for batch, inputs in result.input_shapes.items())
    parts = [f"{result.models[1]} against {result.models[0]}",
             f"machine: {machine['platform']}, {machine['cpus']} CPUs, onnxruntime {machine['onnxruntime']}",
             *([f"input shapes: {shapes}"] if shapes else []),
             tabulate(rows, headers, tablefmt=style, disable_numparse=True),
             ("limit: none, the compressed model has quantized layers" if limit is None else
              f"limit = dense-layer multiply-adds, compressed / original ({limit:.3f})")
             + "; 'of possible gain' = (1 - ratio) / (1 - limit); 'not resolved': the rounds straddle 1 or spread "
               "wider than the effect, so the measurement cannot tell which model is faster"]
    memory = [[name, f"{m.file_bytes:,}", f"{m.weight_params:,}", f"{m.weight_bytes:,}", _mib(m.peak_rss_bytes),
               _mib(m.rss_increase_bytes)] for name, m in result.memory.items()]
    parts.append(tabulate(memory, ["model", "file bytes", "weight params", "weight bytes", "peak RSS MiB",
                                   "RSS increase MiB"], tablefmt=style, disable_numparse=True))
    parts += [format_verification(v, markdown) for v in result.accuracy.values()]
    parts += [f"note: {n}" for n in result.notes]
    return "\n\n".join(parts)


def plot_benchmark(result: BenchmarkResult, path: str | os.PathLike) -> Path:
    """Bars of the latency ratio per provider and batch size, with the size ratio and the limit as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInputError("plotting needs matplotlib: pip install 'onnx-arsvd[plot]'") from None
    labels = [f"{_short(c.provider)}\nbatch {c.batch}" for c in result.latency]
    ratios = [c.ratio for c in result.latency]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(labels) + 4.5), 4.0))
    bars = axes.bar(labels, ratios, color="tab:blue", label="latency ratio (median of interleaved pairs)")
    axes.bar_label(bars, labels=[f"{c.ratio:.2f}\n[{c.ratio_p10:.2f}, {c.ratio_p90:.2f}]" for c in result.latency],
                   fontsize="small", padding=2)
    if result.dense_flop_ratio is not None:
        axes.axhline(result.dense_flop_ratio, color="tab:green", linestyle="--",
                     label=f"dense multiply-add ratio, the limit ({result.dense_flop_ratio:.2f})")
    memory = result.memory
    if "original" in memory and "compressed" in memory:
        size = memory["compressed"].file_bytes / memory["original"].file_bytes
        axes.axhline(size, color="tab:orange", linestyle=":", label=f"file size ratio ({size:.2f})")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_ylim(0, max([1.0, *ratios]) * 1.25)
    axes.set_ylabel("compressed / original (lower is better)")
    names = " vs ".join(Path(m).name for m in reversed(result.models))
    axes.set_title(f"{names}\nlatency ratio per provider and batch; [p10, p90] of the pairs", fontsize="medium")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    figure.tight_layout()
    target = Path(path)
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target
