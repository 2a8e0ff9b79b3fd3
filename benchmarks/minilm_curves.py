"""Why all-MiniLM-L6-v2 barely factors without fine-tuning: its layers' loss curves, at the rank limit.

The loss curve of every MatMul weight (``onnx_arsvd.numerics.losscurve``) from the Gram matrices of 120
polarity sentences (the calibration part ``--min-cosine`` uses: 40% of the 200 held out, seed 0):
for each kind of projection (6 blocks each), the relative output error ||X W - X A B||^2 / ||X W||^2
at the largest rank a factored layer may have (0.8 x break-even) and at half of it, and the rank
(as a share of break-even) that keeps the error at 1% and 0.1%. A share above 0.8 means the layer
cannot be factored at that error at all.

Usage: python benchmarks/minilm_curves.py [--out benchmarks/results/minilm_curves.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


import numpy as np

from benchmarks.results_io import package_versions, write_result
from benchmarks.text_eval import MINILM, load_text_set, minilm_built
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.io.models import load_model
from onnx_arsvd.measure.calibration import capture_grams
from onnx_arsvd.methods.lowrank.curves import weight_curves
from onnx_arsvd.numerics.rank import break_even_rank
from onnx_arsvd.search.parts import split_data

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "minilm_curves.md"
KINDS = (("query", "attention/self/query"), ("key", "attention/self/key"), ("value", "attention/self/value"),
         ("attention output", "attention/output/dense"), ("intermediate (fc1)", "intermediate/dense"),
         ("output (fc2)", "layer.%d/output/dense"))


def _kind(name: str) -> str:
    for label, pattern in KINDS:
        if pattern.replace("layer.%d/", "") in name and (label != "output (fc2)" or "attention" not in name):
            return label
    return "other"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not minilm_built():
        return 1
    feed, _ = load_text_set("polarity")
    calibration, _ = split_data(feed, 0.4, 0)
    model = load_model(MINILM)
    layers = [layer for layer in find_layers(model)[0] if not layer.is_embedding]
    curves = weight_curves(layers, capture_grams(model, layers, calibration))
    rows: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
    shapes: dict[str, tuple[int, int]] = {}
    for c in curves:
        relative, limit = c.curve.relative(), break_even_rank(c.curve.shape)
        kind = _kind(c.layers[0].name)
        shapes[kind] = c.curve.shape
        at_limit, at_half = relative[int(0.8 * limit)], relative[int(0.4 * limit)]
        need = [int(np.argmax(relative <= level)) / limit for level in (0.01, 0.001)]
        rows[kind].append((at_limit, at_half, *need))
    lines = ["# Loss curves of all-MiniLM-L6-v2's projections (whitened, 120 polarity sentences)", "",
             "- command: `python benchmarks/minilm_curves.py`;"
             f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             f"- machine: {platform.platform()}, {os.cpu_count()} CPUs; {package_versions()}",
             "- error = relative squared output error on the calibration sentences; mean (min-max) over the 6 blocks",
             "", "| projection | W (in x out) | error at 0.8 x break-even | error at 0.4 x break-even |"
             " rank for 1% error (x break-even) | rank for 0.1% (x break-even) |", "|---|---|---:|---:|---:|---:|"]
    for kind, values in rows.items():
        v = np.asarray(values)
        cells = [f"{v[:, i].mean():.3g} ({v[:, i].min():.3g}-{v[:, i].max():.3g})" for i in range(4)]
        lines.append(f"| {kind} | {shapes[kind][0]}x{shapes[kind][1]} | {' | '.join(cells)} |")
    write_result("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
