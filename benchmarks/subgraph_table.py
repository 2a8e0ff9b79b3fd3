"""Compress the shipped model whose hidden layer sits in the branches of an If (models/branch_mlp.onnx).

``models/train_branch_mlp.py`` trains it on scikit-learn digits and exports it with torch.onnx: the
trunk and head are main-graph Gemms, the two 128 x 128 hidden layers are Gemms inside the If's
branches on weights captured from the main graph. For each rank policy: per-layer ranks (``*`` =
kept dense), dense parameters kept, file size, and test accuracy of each branch on the 540 held-out
digits (``models/digits_test.npz``), original and compressed, run in onnxruntime. No timings.

Usage: python benchmarks/subgraph_table.py [--out benchmarks/results/subgraph_table.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]

from results_io import package_versions, write_result

from onnx_arsvd import EnergyPolicy, RatioPolicy, compress
from onnx_arsvd.rank import RankPolicy

MODEL = ROOT / "models" / "branch_mlp.onnx"
DATA = ROOT / "models" / "digits_test.npz"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "subgraph_table.md"
POLICIES: list[RankPolicy] = [EnergyPolicy(0.95), EnergyPolicy(0.9), EnergyPolicy(0.8), RatioPolicy(0.25)]
BRANCHES = {"relu branch (branch = +1)": 1.0, "tanh branch (branch = -1)": -1.0}


def accuracies(path: Path) -> list[float]:
    """Test accuracy of each branch, in BRANCHES order."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with np.load(DATA) as data:
        x, labels = data["input"], data["labels"]
    return [float(np.mean(session.run(None, {"input": x, "branch": np.array([flag], np.float32)})[0].argmax(1) == labels))
            for flag in BRANCHES.values()]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    original = accuracies(MODEL)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, policy in enumerate(POLICIES):
            out = Path(tmp) / f"branch_{i}.onnx"
            _, report = compress(MODEL, out, policy=policy, check=False)
            ranks = " / ".join(f"{d.name.split('::')[-1]} {d.rank}{'' if d.factored else '*'}" for d in report.layers)
            compressed = accuracies(out)
            rows.append([policy.describe(), f"`{ranks}`",
                         f"{report.dense_params_after:,} ({report.dense_params_after / report.dense_params_before:.1%})",
                         f"{out.stat().st_size:,}",
                         *(f"{a:.2%} -> {c:.2%}" for a, c in zip(original, compressed, strict=True))])
    headers = ["policy", "ranks (`*` dense)", "dense params kept", "file bytes", *(f"accuracy, {b}" for b in BRANCHES)]
    lines = [
        "# A model with its hidden layers inside If branches (models/branch_mlp.onnx)",
        "",
        f"- command: `{shlex.join(['python', 'benchmarks/subgraph_table.py', *argv])}`",
        f"- date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- versions: {package_versions()}",
        f"- original: {MODEL.stat().st_size:,} bytes; tool defaults otherwise (factor at rank <= 0.8 x break-even, "
        ">= 4096 parameters); accuracy on the 540 test digits, each branch forced by the `branch` input",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(headers) - 2)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    write_result("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main(sys.argv[1:])
