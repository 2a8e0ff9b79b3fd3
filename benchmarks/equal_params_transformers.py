"""Global allocation against one threshold at equal parameters, on the two real transformers.

``compress(..., budget=Budget(target_params=T))`` on all-MiniLM-L6-v2 (the 200 polarity sentences) and
PP-OCRv6 text recognition (the 120 calibration lines), with (a) plain ARSVD (SVD factors, one energy
threshold), (b) activation-aware factors with one output-energy threshold, and (c) the global allocation
(knapsack over every layer's loss curve, measured end-to-end layer responses): the issue's "beat the single
threshold at equal parameters on every shipped model", shown on the models the MLP table
(``benchmarks/frontier.py``) does not cover. Quality is the output cosine on the tool's own held-out part
(40% of the calibration data, seed 0) and on a set no method saw: the 200 newsgroups posts for MiniLM (real
tokens only), the 87 test lines for PP-OCR.

Usage: python benchmarks/equal_params_transformers.py [--models minilm ppocr]
       [--out benchmarks/results/equal_params_transformers.md]
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

from benchmarks.results_io import compress_studied, package_versions, write_result
from benchmarks.text_eval import MINILM, load_text_set
from onnx_arsvd import verify
from onnx_arsvd.search.budget import Budget

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "models" / "build"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "equal_params_transformers.md"
METHODS = {  # label -> (compress keyword arguments, Budget keyword arguments)
    "plain ARSVD, one threshold": ({"method": "svd"}, {"allocation": "threshold"}),
    "activation-aware, one threshold": ({"method": "whitened"}, {"allocation": "threshold"}),
    "activation-aware, global allocation": ({"method": "whitened"}, {}),
}


def _ppocr_data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    with np.load(BUILD / "ppocr_calibration.npz") as calibration, np.load(BUILD / "ppocr_test.npz") as test:
        return {"x": calibration["x"]}, {"x": test["x"]}


def _minilm_data() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    return load_text_set("polarity")[0], load_text_set("newsgroups")[0]


CASES = {  # name -> (model, data loader, dense-parameter targets, what the unseen set is)
    "minilm": (MINILM, _minilm_data, (0.95, 0.85, 0.70), "newsgroups posts"),
    "ppocr": (BUILD / "ppocr_rec.onnx", _ppocr_data, (0.60, 0.40, 0.25), "test lines"),
}


def table(name: str, workdir: Path) -> list[str]:
    """One row per target and method: parameters kept and output cosine held out and on the unseen set."""
    model, load, targets, unseen = CASES[name]
    calibration, test = load()
    lines = [f"| target | method | dense params kept | factored | held-out cosine mean / min |"
             f" {unseen}: cosine mean / min | s |", "|---:|---|---:|---:|---:|---:|---:|"]
    for target in targets:
        for label, (settings, options) in METHODS.items():
            output = workdir / f"{name}_{target}_{len(lines)}.onnx"
            started = time.perf_counter()
            report, _ = compress_studied(model, output, budget=Budget(target_params=target, **options),
                                         data=calibration, **settings)
            seconds = time.perf_counter() - started
            assert report.verification is not None
            held = report.verification.outputs[0]
            seen = verify(model, output, data=test).outputs[0]
            lines.append(f"| {target:.0%} | {label} | {report.dense_params_after / report.dense_params_before:.1%} |"
                         f" {report.factored}/{len(report.layers)} | {held.mean_cosine:.4f} / {held.min_cosine:.4f} |"
                         f" {seen.mean_cosine:.4f} / {seen.min_cosine:.4f} | {seconds:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    missing = [str(CASES[name][0]) for name in args.models if not Path(CASES[name][0]).exists()]
    if missing:
        print(f"missing {', '.join(missing)}: run python models/build_minilm.py and python models/build_ppocr.py",
              file=sys.stderr)
        return 1
    started = time.perf_counter()
    parts = [
        "# Global allocation vs one threshold at equal parameters (MiniLM, PP-OCRv6)",
        "",
        f"- command: `python benchmarks/equal_params_transformers.py --models {' '.join(args.models)}`;"
        f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f};"
        f" {package_versions()}",
        "- `compress(..., budget=Budget(target_params=T))`, default gates (rank <= 0.8 x break-even, >= 4096"
        " parameters); the cosine is per sample over each whole output (MiniLM: `last_hidden_state` at real"
        " tokens); held-out = the tool's own 40% of the calibration data, never used to choose anything",
    ]
    with tempfile.TemporaryDirectory(prefix="equal_params_") as folder:
        for name in args.models:
            parts += ["", f"## {Path(CASES[name][0]).name}", "", *table(name, Path(folder))]
    parts += ["", f"Wall time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}."]
    write_result("\n".join(parts) + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
