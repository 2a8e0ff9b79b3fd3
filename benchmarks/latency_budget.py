"""The budget search minimizing parameters against minimizing measured latency, same budget, same data.

For each model and budget, ``compress`` runs twice with the latency guard on (batch 1 and 32): once
with ``minimize="params"`` (the default: the fewest parameters, then the guard keeps dense the layers
that are not faster) and once with ``minimize="latency"`` (every rank priced from the guard's
per-shape latency table inside the search). Held-out quality, parameters, the layers the guard
turned back to dense, and the guard's whole-model timing against the original are each run's own
report. Then the two outputs are timed against each other directly (interleaved rounds of fresh
sessions, median of per-pair ratios) at each batch size.

MiniLM runs on the 200 polarity sentences padded to 128 tokens, and its whole-model timings use
sequence 128 (the issue's batch 32, sequence 128); the MLPs on their shipped test sets.

Usage: python -m benchmarks.latency_budget [--models fashion digits minilm] [--out PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx_ir as ir

from benchmarks.results_io import (
    MINILM_PACKAGES,
    compress_studied,
    header,
    held_out_quality,
    markdown_table,
    write_result,
)
from benchmarks.text_eval import MINILM, minilm_built
from onnx_arsvd import Report
from onnx_arsvd.config import LatencyGuard
from onnx_arsvd.measure.benchmark import batch_feed, compare_latency, timed_rounds
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.search.budget import Budget

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latency_budget.md"
BATCHES = (1, 32)


@dataclass(frozen=True)
class Case:
    """One model, its data, the budgets it is searched under and the symbolic dims its timings use."""

    name: str
    model: Path
    data: Path
    budgets: tuple[Budget, ...]
    dims: dict[str, int]


CASES = {
    "fashion": Case("fashion_mlp.onnx", MODELS / "fashion_mlp.onnx", MODELS / "fashion_test.npz",
                    (Budget(max_drop=0.5), Budget(max_drop=1.0)), {}),
    "digits": Case("digits_mlp.onnx", MODELS / "digits_mlp.onnx", MODELS / "digits_test.npz",
                   (Budget(max_drop=1.0),), {}),
    "minilm": Case("all-MiniLM-L6-v2", MINILM, MODELS / "build" / "polarity.npz",
                   (Budget(min_cosine=0.99), Budget(min_cosine=0.95)), {"seq": 128}),
}


def _row(case: Case, budget: Budget, report: Report, missed: bool, seconds: float) -> list[object]:
    reverted = sum(1 for layer in report.layers if layer.reason.startswith("latency guard"))
    whole = " / ".join(f"{c.ratio:.3f}" for c in report.latency_check) or "nothing factored"
    # the search's answer: the feasible frontier point of least cost (the lowest index)
    chosen = min((s for s in report.budget["steps"] if s["feasible"]), key=lambda s: s["point"], default=None)
    predicted = "" if chosen is None or chosen.get("latency") is None else f"{chosen['latency']:.3f}"
    kept = report.dense_params_after / report.dense_params_before
    quality = held_out_quality(report) + (" **MISSED**" if missed else "")
    return [case.name, budget.describe(), budget.minimize, f"{kept:.1%}", predicted, f"{report.factored} ({reverted})",
            quality, whole, f"{seconds:.0f}"]


def _head_to_head(case: Case, by_params: Path, by_latency: Path) -> list[list[object]]:
    """The latency-minimized model against the params-minimized one, at each batch size."""
    model = ir.load(by_params)
    rows = []
    for batch in BATCHES:
        feed = batch_feed(make_session(os.fspath(by_params)), model, batch, case.dims)
        rounds = timed_rounds(os.fspath(by_params), os.fspath(by_latency), feed, min_seconds=3.0, min_runs=20)
        comparison = compare_latency("CPUExecutionProvider", batch, rounds)
        rows.append([batch, f"{comparison.original.median_ms:.4g}", f"{comparison.compressed.median_ms:.4g}",
                     f"{comparison.ratio:.3f} [{comparison.ratio_p10:.3f}, {comparison.ratio_p90:.3f}]",
                     ", ".join(f"{r:.3f}" for r in comparison.round_ratios)])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if "minilm" in args.models and not minilm_built():
        return 1
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows: list[list[object]] = []
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="latency_budget_") as folder:
        for key in args.models:
            case = CASES[key]
            with np.load(case.data) as archive:
                data = {name: archive[name] for name in archive.files}
            for number, budget in enumerate(case.budgets):
                outputs = {}
                for minimize in ("params", "latency"):
                    chosen = Budget(max_drop=budget.max_drop, min_cosine=budget.min_cosine, minimize=minimize)
                    output = Path(folder) / f"{key}_{number}_{minimize}.onnx"
                    guard = LatencyGuard(batches=BATCHES)
                    begun = time.perf_counter()
                    report, missed = compress_studied(case.model, output, budget=chosen, data=data, guard=guard,
                                                      dims=case.dims)
                    rows.append(_row(case, chosen, report, missed, time.perf_counter() - begun))
                    outputs[minimize] = output
                head = _head_to_head(case, outputs["params"], outputs["latency"])
                sections += [f"### {case.name}, {budget.describe()}: latency-minimized model vs params-minimized",
                             "", markdown_table(["batch", "params-min ms", "latency-min ms",
                                                 "ratio (latency-min / params-min) [p10, p90]", "per round"],
                                                head, "rrrrl"), ""]
    text = "\n".join([
        *header("Budget search: minimize parameters or measured latency", __file__, argv,
                packages=MINILM_PACKAGES,
                notes=[f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end (shared 2-CPU machine)",
                       f"latency guard at batch {', '.join(map(str, BATCHES))} on CPU in every run; each budget "
                       "split its data 60/40 (seed 0), every quality figure is on the held-out 40%",
                       f"wall time {time.perf_counter() - started:.0f} s"]),
        "",
        "## Each run",
        "",
        "`predicted layer latency`: the search's prediction for the chosen point, as a share of the dense "
        "layers' latency (latency runs only); `factored (reverted)`: layers factored in the output, and in "
        "brackets layers the guard turned back to dense after the search; `whole model`: the guard's check, "
        "compressed / original median latency at batch 1 / 32.",
        "",
        markdown_table(["model", "budget", "minimize", "dense params kept", "predicted layer latency",
                        "factored (reverted)", "held-out quality", "whole model b1 / b32 (x original)",
                        "compress s"], rows, "lllrrrlll"),
        "",
        "## Head to head",
        "",
        *sections,
    ])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
