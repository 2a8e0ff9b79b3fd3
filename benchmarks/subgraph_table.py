"""Compress the shipped model whose hidden layer sits in the branches of an If (models/branch_mlp.onnx).

``models/train_branch_mlp.py`` trains it on scikit-learn digits and exports it with torch.onnx: the
trunk and head are main-graph Gemms, the two 128 x 128 hidden layers are Gemms inside the If's
branches on weights captured from the main graph. For each rank policy: per-layer ranks (``*`` =
kept dense), dense parameters kept, file size, and test accuracy of each branch on the 540 held-out
digits (``models/digits_test.npz``), original and compressed, run in onnxruntime. Then plain SVD
against whitened factors calibrated inside the branches (half the test split calibrates, the other
half measures). No timings.

Usage: python -m benchmarks.subgraph_table [--out benchmarks/results/subgraph_table.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnxruntime as ort

from benchmarks.results_io import header, write_result
from onnx_arsvd import EnergyPolicy, RatioPolicy, compress
from onnx_arsvd.numerics.rank import RankPolicy

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "branch_mlp.onnx"
DATA = ROOT / "models" / "digits_test.npz"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "subgraph_table.md"
POLICIES: list[RankPolicy] = [EnergyPolicy(0.95), EnergyPolicy(0.9), EnergyPolicy(0.8), RatioPolicy(0.25)]
BRANCHES = {"relu branch (branch = +1)": 1.0, "tanh branch (branch = -1)": -1.0}


WHITENED_RATIOS = (0.25, 0.15, 0.1)
CALIBRATION_ROWS = 270  # the first half of the test split calibrates; the second half measures


class BothBranches:
    """A CalibrationDataReader: the calibration images once through each branch."""

    def __init__(self, x: np.ndarray) -> None:
        self._feeds = iter([{"input": x, "branch": np.array([flag], np.float32)} for flag in BRANCHES.values()])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def accuracies(path: Path, rows: slice = slice(None)) -> list[float]:
    """Test accuracy of each branch on the chosen rows of the test split, in BRANCHES order."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with np.load(DATA) as data:
        x, labels = data["input"][rows], data["labels"][rows]
    return [float(np.mean(session.run(None, {"input": x, "branch": np.array([flag], np.float32)})[0].argmax(1)
                          == labels))
            for flag in BRANCHES.values()]


def whitened_rows(tmp: Path) -> list[list[str]]:
    """Plain SVD and whitened factors at the same ranks, calibrated inside the branches, on the held-out half."""
    with np.load(DATA) as data:
        calibration = data["input"][:CALIBRATION_ROWS]
    held_out = slice(CALIBRATION_ROWS, None)
    original = accuracies(MODEL, held_out)
    rows = []
    for ratio in WHITENED_RATIOS:
        cells = {}
        for method in ("svd", "whitened"):
            out = tmp / f"branch_{method}_{ratio}.onnx"
            reader = BothBranches(calibration) if method == "whitened" else None
            _, report = compress(MODEL, out, policy=RatioPolicy(ratio), method=method, calibration=reader, check=False)
            cells[method] = accuracies(out, held_out)
        kept = f"{report.dense_params_after / report.dense_params_before:.1%}"
        for i, branch in enumerate(BRANCHES):
            rows.append([f"ratio({ratio:g})", kept, branch, f"{original[i]:.2%}", f"{cells['svd'][i]:.2%}",
                         f"{cells['whitened'][i]:.2%}"])
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    original = accuracies(MODEL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, policy in enumerate(POLICIES):
            out = Path(tmp) / f"branch_{i}.onnx"
            _, report = compress(MODEL, out, policy=policy, check=False, factor_heads=True)
            ranks = " / ".join(f"{d.name.split('::')[-1]} {d.rank}{'' if d.factored else '*'}" for d in report.layers)
            compressed = accuracies(out)
            rows.append([policy.describe(), f"`{ranks}`",
                         f"{report.dense_params_after:,} "
                         f"({report.dense_params_after / report.dense_params_before:.1%})",
                         f"{out.stat().st_size:,}",
                         *(f"{a:.2%} -> {c:.2%}" for a, c in zip(original, compressed, strict=True))])
        whitened = whitened_rows(Path(tmp))
    headers = ["policy", "ranks (`*` dense)", "dense params kept", "file bytes", *(f"accuracy, {b}" for b in BRANCHES)]
    lines = [
        *header("A model with its hidden layers inside If branches (models/branch_mlp.onnx)", __file__, argv),
        f"- original: {MODEL.stat().st_size:,} bytes; tool defaults otherwise (factor at rank <= 0.8 x break-even, "
        ">= 4096 parameters); accuracy on the 540 test digits, each branch forced by the `branch` input",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "## Calibration inside the branches",
        "",
        f"The first {CALIBRATION_ROWS} test images, once through each branch, calibrate `--method whitened` (the "
        "layers inside the If see only the rows their branch ran on); accuracy on the other "
        f"{540 - CALIBRATION_ROWS}, same ranks for both methods.",
        "",
        "| policy | dense params kept | branch | original | plain SVD | whitened |",
        "|---|---:|---|---:|---:|---:|",
        *("| " + " | ".join(row) + " |" for row in whitened),
    ]
    write_result("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
