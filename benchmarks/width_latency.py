"""Does a narrowed model's latency follow its parameters? all-MiniLM-L6-v2 with every FFN narrowed alike.

Every FFN of ``models/build/minilm.onnx`` narrowed to a share of its 1536 units (the tool's choice and refit,
calibrated on the 200 polarity sentences), then timed against the original with
``onnx_arsvd.measure.benchmark.benchmark_models`` (fresh sessions, runs interleaved pairwise, medians, one
intra-op thread) at batch 1 and 32, sequence 128: the whole-model latency ratio beside the dense-parameter and
multiply-add ratios. Narrowing adds no operator, so the gap is what the rest of the model (attention, norms,
embeddings) costs.

Usage: python -m benchmarks.width_latency [--shares 0.75 0.5 0.25] [--seconds 2]
       [--out benchmarks/results/width_latency.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx_ir as ir

from benchmarks.results_io import header, markdown_table, write_result
from benchmarks.text_eval import MINILM, load_text_set, minilm_built
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.io.models import weight_stats
from onnx_arsvd.measure.benchmark import benchmark_models
from onnx_arsvd.measure.calibration import input_moments
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.method import Width, unit_curves

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "width_latency.md"
BATCHES = (1, 32)
SEQUENCE = 128


def _dense_params(model: ir.Model) -> int:
    return sum(layer.shape[0] * layer.shape[1] for layer in find_layers(model)[0] if not layer.is_embedding)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not minilm_built():
        return 1
    load = os.getloadavg()[0]
    model = ir.load(MINILM)
    units = [u for u in find_width_units(find_layers(model)[0])[0] if u.group == 1]  # the FFNs
    curves = unit_curves(units, input_moments(model, [u.exit for u in units], load_text_set("polarity")[0]))
    dims = {str(d): SEQUENCE for v in model.graph.inputs if v.shape for d in v.shape[1:] if not isinstance(d, int)}
    dense = _dense_params(model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="width_latency_") as folder:
        for share in args.shares:
            narrowed = model.clone()
            method = Width()
            method.rewrite(method.plan(narrowed, {c.key: int(round(share * c.unit.width)) for c in curves},
                                       curves))(narrowed)
            path = Path(folder) / f"narrowed_{share}.onnx"
            ir.save(narrowed, path)
            result = benchmark_models(MINILM, path, batches=BATCHES, threads=1, dims=dims, min_seconds=args.seconds,
                                      memory=False, providers=["cpu"])
            ratios = {c.batch: c for c in result.latency}
            params = weight_stats(narrowed)[0] / weight_stats(model)[0]
            rows.append((f"{share:.0%}", f"{_dense_params(narrowed) / dense:.3f}", f"{params:.3f}",
                         f"{result.dense_flop_ratio:.3f}" if result.dense_flop_ratio is not None else "-",
                         *(f"{ratios[b].ratio:.3f} ({ratios[b].ratio_p10:.2f}-{ratios[b].ratio_p90:.2f})"
                           for b in BATCHES)))
            print(rows[-1], file=sys.stderr, flush=True)
    columns = ["FFN units kept", "dense params", "all params", "dense multiply-adds",
               *(f"latency x original, batch {b} x {SEQUENCE} (p10-p90)" for b in BATCHES)]
    text = "\n".join([*header("Width-only MiniLM: latency against parameters", __file__, argv,
                              notes=[f"load average at start {load:.1f}, at end {os.getloadavg()[0]:.1f}",
                                     "one intra-op thread, CPU execution provider, sessions with spinning off",
                                     "ratios are narrowed / original; the embeddings, attention and norms are not "
                                     "narrowed"]),
                      "", markdown_table(columns, rows, "lrrrrr")]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
