"""How far apart are two onnxruntime sessions of one and the same model? (A/A timing)

For each shipped MLP at batch 1 and 32: several trials, each creating two fresh sessions of the same
file and timing them interleaved like ``bench``; the median per-pair ratio of each trial shows the
session-to-session spread that no real difference below it can be told from. A third session timed
against itself (the same session object twice) shows the spread of the timing loop alone.

Usage: python -m benchmarks.session_noise [--trials 6] [--seconds 1] [--out benchmarks/results/session_noise.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.results_io import header, write_result
from onnx_arsvd.io.models import load_model
from onnx_arsvd.measure.benchmark import batch_feed, interleaved_times
from onnx_arsvd.measure.verification import make_session

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "session_noise.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    lines = ["| model | batch | two sessions, one file: median ratio per trial | range"
             " | one session vs itself: range |",
             "|---|---:|---|---:|---:|"]
    for name in ("fashion", "digits"):
        path = ROOT / "models" / f"{name}_mlp.onnx"
        model = load_model(path)
        for batch in (1, 32):
            feed = batch_feed(make_session(path), model, batch, {})
            pair_ratios, self_ratios = [], []
            for _ in range(args.trials):
                first, second = make_session(path), make_session(path)
                a, b = interleaved_times(first, second, feed, min_seconds=args.seconds)
                pair_ratios.append(float(np.median(b / a)))
                a, b = interleaved_times(first, first, feed, min_seconds=args.seconds / 2)
                self_ratios.append(float(np.median(b / a)))
            lines.append(f"| {path.name} | {batch} | {', '.join(f'{r:.3f}' for r in pair_ratios)} | "
                         f"{min(pair_ratios):.3f}-{max(pair_ratios):.3f} | "
                         f"{min(self_ratios):.3f}-{max(self_ratios):.3f} |")
            print(lines[-1], flush=True)
    text = "\n".join([
        *header("Session-to-session timing noise (A/A)", __file__, argv,
                notes=[f"{args.trials} trials, {args.seconds:g} s each; CPU provider, default threads, spinning off"]),
        "",
        *lines,
    ]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
