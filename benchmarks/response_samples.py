"""Layer responses measured on a few calibration samples against all of them (MiniLM, and the Fashion MLP's count).

The budget search measures each layer's end-to-end response (``onnx_arsvd.measure.sensitivity``) on the first
calibration samples whose outputs hold ``RESPONSE_VALUES`` values (``onnx_arsvd.search.parts.response_batches``).
This script takes the budget's own split of the 200 polarity sentences (120 calibration), computes every
fifth MiniLM weight's response on all 120 and on the search's subset, and reports the model-level
distortion D each predicts at layer errors e = 0.01 and 0.1, their ratio and the time each took. It also
prints how many samples the rule keeps for the Fashion MLP (10 logits per image: all of them).

Usage: python -m benchmarks.response_samples [--out benchmarks/results/response_samples.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort

from benchmarks.results_io import MINILM_PACKAGES, header, markdown_table, write_result
from benchmarks.text_eval import MINILM, load_text_set, minilm_built
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.io.data import Feed, load_data, sample_count, split_batches
from onnx_arsvd.io.models import to_model
from onnx_arsvd.measure.calibration import capture_grams
from onnx_arsvd.measure.sensitivity import layer_responses
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.methods.lowrank.curves import weight_curves
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.parts import response_batches, split_data

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "response_samples.md"


def calibration_batches(model: Path, arrays: dict[str, np.ndarray]) -> tuple[Feed, list[Feed], ort.InferenceSession]:
    """The budget's calibration part of ``arrays`` (checked), the same in the verification's batches, the session."""
    budget = Budget(min_cosine=0.99)
    calibration, _ = split_data(arrays, budget.holdout, budget.seed)
    session = make_session(os.fspath(model))
    feed = load_data(calibration, session)[0]
    return feed, list(split_batches(feed, session, 64)), session


def samples(batches: list[Feed]) -> int:
    return sum(sample_count(feed) for feed in batches)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not minilm_built():
        return 1
    with np.load(ROOT / "models" / "fashion_test.npz") as archive:
        fashion = {name: archive[name] for name in archive.files}
    _, fashion_batches, fashion_session = calibration_batches(ROOT / "models" / "fashion_mlp.onnx", fashion)
    fashion_note = (f"Fashion MLP: the rule keeps {samples(response_batches(fashion_session, fashion_batches))} of "
                    f"{samples(fashion_batches)} calibration images.")
    feed, _ = load_text_set("polarity")
    calibration, batches, session = calibration_batches(MINILM, dict(feed))
    subset = response_batches(session, batches)
    model = to_model(MINILM)
    layers = [layer for layer in find_layers(model)[0] if not layer.is_embedding]
    curves = weight_curves(layers, capture_grams(model, layers, calibration))[::5]
    started = time.perf_counter()
    everything = layer_responses(MINILM, curves, batches)
    all_seconds = time.perf_counter() - started
    started = time.perf_counter()
    few = layer_responses(MINILM, curves, subset)
    few_seconds = time.perf_counter() - started
    errors = np.array([0.01, 0.1])
    rows = []
    for curve in curves:
        d_all, d_few = everything[curve.key](errors), few[curve.key](errors)
        rows.append([curve.layers[0].name, *(f"{v:.5f}" for v in d_all), *(f"{v:.5f}" for v in d_few),
                     *(f"{r:.3f}" for r in d_few / np.where(d_all > 0, d_all, 1.0))])
    columns = ["layer", "D(0.01), all", "D(0.1), all", "D(0.01), subset", "D(0.1), subset", "ratio at 0.01",
               "ratio at 0.1"]
    text = "\n".join([
        *header("Layer responses on a subset of the calibration part", "benchmarks/response_samples.py", argv,
                packages=MINILM_PACKAGES,
                notes=[f"load average {os.getloadavg()[0]:.1f} at end",
                       f"MiniLM: {len(curves)} weights (every fifth); all {samples(batches)} calibration sentences "
                       f"took {all_seconds:.1f} s, the rule's first {samples(subset)} took {few_seconds:.1f} s",
                       fashion_note]),
        "",
        markdown_table(columns, rows, "l" + "r" * 6),
    ])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
