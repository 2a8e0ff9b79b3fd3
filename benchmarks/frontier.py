"""Global rank allocation against one global threshold, and the size/quality frontier with quantization (MLPs).

Each model's test split is divided once (seeded, 40% held out) as ``compress --max-drop`` divides
it; every quality figure is on the held-out part, which no method used to choose anything.

1. Equal parameters: ``--target-params T`` with (a) plain ARSVD (SVD factors, one energy threshold),
   (b) activation-aware factors with one output-energy threshold (the search before this change),
   (c) the global allocation (knapsack over every layer's loss curve, measured layer responses).
2. Layer responses: how much of each layer's own relative output error reaches the logits (the
   power law fitted from two probes), and, at the allocation ``--target-params 0.15`` chose, the
   summed prediction against the measured relative squared output error, calibration part.
3. Accuracy budgets: the smallest model each method returns within B points (judged on the
   calibration part by the 95% prediction bound), with the global allocation also refitted
   sequentially and combined with INT8 / INT4; INT8 and INT4 alone from the same run's frontier.
   Size = the written file / the original file; latency = interleaved against the original in
   fresh sessions (2 rounds, ratio = median of per-pair ratios, below 1 = faster).

Usage: python benchmarks/frontier.py [--models fashion digits] [--out benchmarks/results/frontier.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import numpy as np
import onnx_ir as ir

from benchmarks.results_io import compress_studied, package_versions, write_result
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.io.data import load_data, split_batches
from onnx_arsvd.io.models import load_model, to_model
from onnx_arsvd.measure.benchmark import compare_latency, timed_rounds
from onnx_arsvd.measure.calibration import capture_grams
from onnx_arsvd.measure.sensitivity import layer_responses, output_distortion
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.measure.verification import DEFAULT_BATCH_SIZE
from onnx_arsvd.methods.lowrank.curves import allocation_plans, weight_curves, weight_options
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.numerics.allocate import best_within, frontier
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.parts import split_data

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "frontier.md"
TARGETS = (0.10, 0.15, 0.25, 0.40)
BUDGETS = (0.5, 1.0)
BATCHES = (1, 32)
HOLDOUT, SEED = 0.4, 0

METHODS = {  # label -> (compress keyword arguments, Budget keyword arguments)
    "plain ARSVD, one threshold": ({"method": "svd"}, {"allocation": "threshold"}),
    "activation-aware, one threshold": ({"method": "whitened"}, {"allocation": "threshold"}),
    "activation-aware, global allocation": ({"method": "whitened"}, {}),
}
BUDGET_METHODS = {
    **METHODS,
    "global, sequential refit": ({"method": "whitened"}, {"sequential": True}),
    "global + INT8": ({"method": "whitened", "quantize": "int8"}, {}),
    "global + INT4": ({"method": "whitened", "quantize": "int4"}, {}),
}


def _latency(original: Path, compressed: Path, feed_source: dict[str, np.ndarray]) -> list[float]:
    """Latency ratio compressed / original at each batch size."""
    session = make_session(original)
    feed = next(split_batches(load_data(feed_source, session)[0], session, max(BATCHES)))
    ratios = []
    for batch in BATCHES:
        part = {k: v[:batch] for k, v in feed.items()}
        rounds = timed_rounds(original, compressed, part, rounds=2, min_seconds=0.3)
        ratios.append(compare_latency("CPUExecutionProvider", batch, rounds).ratio)
    return ratios


def equal_params(name: str) -> list[str]:
    model, data = MODELS / f"{name}_mlp.onnx", MODELS / f"{name}_test.npz"
    lines = ["| target | method | dense params kept | ranks (`*` dense) | held-out drop (pts) |"
             " held-out output rel. error |",
             "|---:|---|---:|---|---:|---:|"]
    for target in TARGETS:
        for label, (settings, options) in METHODS.items():
            report, _ = compress_studied(model, budget=Budget(target_params=target, **options), data=data,
                                         **settings)
            v = report.verification
            ranks = "/".join(str(d.rank) + ("" if d.factored else "*") for d in report.layers)
            lines.append(f"| {target:.0%} | {label} | {report.dense_params_after / report.dense_params_before:.1%} |"
                         f" `{ranks}` | {v.accuracy_drop:+.2f} | {v.outputs[0].relative_error:.4f} |")
    return lines


def responses(name: str) -> list[str]:
    """Each layer's fitted response, and predicted vs measured model error at the 15% allocation."""
    model_path, data = MODELS / f"{name}_mlp.onnx", MODELS / f"{name}_test.npz"
    with np.load(data) as archive:
        calibration, _ = split_data({k: archive[k] for k in archive.files}, HOLDOUT, SEED)
    inputs = {k: v for k, v in calibration.items() if k != "labels"}
    model = load_model(model_path)
    layers = find_layers(model)[0]
    curves = weight_curves(layers, capture_grams(model, layers, inputs))
    session = make_session(model_path)
    batches = list(split_batches(load_data(inputs, session)[0], session, DEFAULT_BATCH_SIZE))
    fitted = layer_responses(model_path, curves, batches)
    lines = ["| layer | W (in x out) | D at e = 0.01 | D at e = 0.1 | power b |", "|---|---|---:|---:|---:|"]
    for c in curves:
        r = fitted[c.key]
        lines.append(f"| {c.key[0]} | {c.curve.shape[0]}x{c.curve.shape[1]} | {float(r(np.array(0.01))):.3g} |"
                     f" {float(r(np.array(0.1))):.3g} | {r.power:.2f} |")
    total = sum(c.curve.shape[0] * c.curve.shape[1] for c in curves)
    point = best_within(frontier(weight_options(curves, responses=fitted)), 0.15 * total)
    candidate = to_model(model_path)
    apply_plans(candidate, allocation_plans(find_layers(candidate)[0], curves, point))
    compressed = make_session(ir.to_proto(candidate).SerializeToString())
    measured = output_distortion([session.run(None, b) for b in batches], [compressed.run(None, b) for b in batches])
    ranks = "/".join(str(k) for k in point.ranks.values())
    lines += ["", f"At the 15% allocation (ranks {ranks}, 0 = dense): predicted"
              f" model error (sum of responses) {point.loss:.4g}, measured {measured:.4g} (relative squared output"
              " error, calibration part)."]
    return lines


def budgets(name: str, workdir: Path) -> list[str]:
    model, data = MODELS / f"{name}_mlp.onnx", MODELS / f"{name}_test.npz"
    with np.load(data) as archive:
        _, held_out = split_data({k: archive[k] for k in archive.files}, HOLDOUT, SEED)
    inputs = {k: v for k, v in held_out.items() if k != "labels"}
    original_bytes = model.stat().st_size
    lines = ["| budget (pts) | method | dense params kept | file (x original) | held-out drop (pts) | within budget |"
             f" latency b{BATCHES[0]} / b{BATCHES[1]} (x original) | search s |",
             "|---:|---|---:|---:|---:|---|---:|---:|"]
    for budget in BUDGETS:
        for label, (settings, options) in BUDGET_METHODS.items():
            output = workdir / f"{name}_{budget}_{len(lines)}.onnx"
            started = time.perf_counter()
            report, _ = compress_studied(model, output, budget=Budget(max_drop=budget, **options), data=data,
                                         **settings)
            seconds = time.perf_counter() - started
            drop = report.verification.accuracy_drop
            latency = " / ".join(f"{r:.2f}" for r in _latency(model, output, inputs))
            lines.append(f"| {budget:g} | {label} | {report.dense_params_after / report.dense_params_before:.1%} |"
                         f" {output.stat().st_size / original_bytes:.3f} | {drop:+.2f} |"
                         f" {'yes' if drop <= budget else '**no (missed)**'} | {latency} | {seconds:.0f} |")
            for row in report.budget["frontier"][1:2] if settings.get("quantize") else []:  # quantization alone
                lines.append(f"| {budget:g} | {row['variant']} (same run's frontier, serialized size) | 100.0% |"
                             f" {row['model_bytes'] / report.budget['frontier'][0]['model_bytes']:.3f} |"
                             f" {row['accuracy_drop']:+.2f} | {'yes' if row['accuracy_drop'] <= budget else 'no'} | |"
                             " |")
            for note in report.budget["notes"]:
                lines.append(f"| {budget:g} | note: {note} | | | | | | |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["fashion", "digits"], choices=["fashion", "digits"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    parts = [
        "# Global allocation vs one threshold, and the frontier with quantization (shipped MLPs)",
        "",
        f"- command: `python benchmarks/frontier.py --models {' '.join(args.models)}`;"
        f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at start"
        f" {os.getloadavg()[0]:.1f} (shared with other jobs: latencies and search times are noisy);"
        f" {package_versions()}",
        f"- each test split divided once ({HOLDOUT:.0%} held out, seed {SEED}); every drop and error is on the"
        " held-out part; default gates (rank <= 0.8 x break-even, >= 4096 parameters: the 10-class heads stay dense)",
    ]
    with tempfile.TemporaryDirectory(prefix="frontier_") as folder:
        for name in args.models:
            parts += ["", f"## {name}_mlp.onnx: equal parameters (`--target-params`)", "", *equal_params(name),
                      "", f"## {name}_mlp.onnx: layer responses (D = model's relative squared output error when"
                      " the layer alone has relative squared output error e)", "", *responses(name),
                      "", f"## {name}_mlp.onnx: accuracy budgets (`--max-drop`)", "", *budgets(name, Path(folder))]
    parts += ["", f"Wall time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}."]
    write_result("\n".join(parts) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
