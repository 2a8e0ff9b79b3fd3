"""Sequential calibration against one-shot Gram matrices, at the same ranks (shipped MLPs).

For each target share of the dense parameters, the global allocation's ranks (loss curves from
one-shot Grams, measured layer responses) are built twice: with the one-shot factors, and with the
factors refitted layer by layer on the partially compressed model (``onnx_arsvd.methods.lowrank.sequential``). Both
are fitted on the calibration part (60%, seed 0) and scored on the held-out part: output relative
error and accuracy drop; and on the calibration part itself, where the refit was fitted.

Usage: python benchmarks/sequential.py [--out benchmarks/results/sequential.md]
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
import onnx_ir as ir

from benchmarks.results_io import package_versions, write_result
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.io.data import load_data, split_batches
from onnx_arsvd.io.models import load_model, to_model
from onnx_arsvd.measure.calibration import capture_grams
from onnx_arsvd.measure.sensitivity import layer_responses
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.measure.verification import DEFAULT_BATCH_SIZE, compare_models
from onnx_arsvd.methods.lowrank.curves import allocation_plans, weight_curves, weight_options
from onnx_arsvd.methods.lowrank.rewrite import apply_plans
from onnx_arsvd.methods.lowrank.sequential import sequential_factors
from onnx_arsvd.numerics.allocate import best_within, frontier
from onnx_arsvd.search.parts import split_data

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "sequential.md"
TARGETS = (0.10, 0.15, 0.25)


def table(name: str) -> list[str]:
    path = MODELS / f"{name}_mlp.onnx"
    with np.load(MODELS / f"{name}_test.npz") as archive:
        calibration, held_out = split_data({k: archive[k] for k in archive.files}, 0.4, 0)
    model = load_model(path)
    layers = find_layers(model)[0]
    inputs = {k: v for k, v in calibration.items() if k != "labels"}
    curves = weight_curves(layers, capture_grams(model, layers, inputs))
    judge = make_session(path)
    parts = {"calibration": calibration, "held-out": held_out}
    batches = {part: list(split_batches(load_data({k: v for k, v in data.items() if k != "labels"}, judge)[0],
                                        judge, DEFAULT_BATCH_SIZE)) for part, data in parts.items()}
    points = frontier(weight_options(curves, responses=layer_responses(path, curves, batches["calibration"])))
    total = sum(c.curve.shape[0] * c.curve.shape[1] for c in curves)
    lines = ["| target | ranks | factors | calibration: rel. error / drop (pts) | held-out: rel. error / drop (pts) |"
             " refit s |", "|---:|---|---|---:|---:|---:|"]
    for target in TARGETS:
        point = best_within(points, target * total)
        started = time.perf_counter()
        refitted = sequential_factors(model, curves, point, batches["calibration"])
        seconds = time.perf_counter() - started
        ranks = "/".join(str(k) if k else "*" for k in point.ranks.values())
        for label, factors in (("one-shot", None), ("sequential", refitted)):
            candidate = to_model(path)
            apply_plans(candidate, allocation_plans(find_layers(candidate)[0], curves, point, factors=factors))
            session = make_session(ir.to_proto(candidate).SerializeToString())
            cells = []
            for part, data in parts.items():
                result = compare_models(judge, session, batches[part], labels=data["labels"])
                cells.append(f"{result.outputs[0].relative_error:.4f} / {result.accuracy_drop:+.2f}")
            lines.append(f"| {target:.0%} | `{ranks}` | {label} | {cells[0]} | {cells[1]} |"
                         f" {seconds if factors is not None else 0:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    parts = ["# Sequential calibration vs one-shot Grams, same ranks (shipped MLPs)", "",
             "- command: `python benchmarks/sequential.py`;"
             f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"
             f" (shared: refit times are noisy); {package_versions()}"]
    for name in ("fashion", "digits"):
        parts += ["", f"## {name}_mlp.onnx", "", *table(name)]
    write_result("\n".join(parts) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
