"""A whole-model latency target (``--target-latency``): the most accurate model within it, and is it met?

For each model and target, ``compress`` runs with ``Budget(target_latency=...)`` and the latency guard at
batch 1 and 32 on CPU: every rank is priced from the guard's per-shape table, and the frontier is
bisected with each candidate's whole model timed against the original (interleaved rounds of fresh
sessions; the 95% upper prediction bound of the ratio, the slower batch size deciding). The written
model is then timed again by ``compress``'s final check, which is what the table shows, and its quality
is measured on the held-out 40% of the data, which the search never saw. A target the final timing misses is shown as
missed (the tool writes nothing then; the study keeps the model to measure it).

One Fashion run has an accuracy budget as well (``--max-drop 1 --target-latency 0.6``): the fastest point
within the accuracy budget by the per-layer prices, then timed whole against the target.

MiniLM runs on the 200 polarity sentences padded to 128 tokens, timed at sequence 128; the MLPs on
their shipped test sets.

Usage: python -m benchmarks.latency_target [--models fashion digits minilm] [--out PATH]
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
from onnx_arsvd.errors import OutputError
from onnx_arsvd.search.budget import Budget

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "latency_target.md"
BATCHES = (1, 32)


@dataclass(frozen=True)
class Case:
    """One model, its data, the budgets it is searched under (with a quantization or none), and its timing dims."""

    name: str
    model: Path
    data: Path
    budgets: tuple[tuple[Budget, str | None], ...]
    dims: dict[str, int]


CASES = {
    "fashion": Case("fashion_mlp.onnx", MODELS / "fashion_mlp.onnx", MODELS / "fashion_test.npz",
                    ((Budget(target_latency=0.6), None), (Budget(target_latency=0.4), None),
                     (Budget(max_drop=1.0, target_latency=0.6), None)), {}),
    "digits": Case("digits_mlp.onnx", MODELS / "digits_mlp.onnx", MODELS / "digits_test.npz",
                   ((Budget(target_latency=0.8), None),), {}),
    "minilm": Case("all-MiniLM-L6-v2", MINILM, MODELS / "build" / "polarity.npz",
                   ((Budget(target_latency=0.9), None), (Budget(target_latency=0.5), "int8")), {"seq": 128}),
}


def _row(case: Case, budget: Budget, quantize: str | None, report: Report, missed: bool,
         seconds: float) -> list[object]:
    searched = report.budget
    steps = searched["steps"]
    if searched["timed"]:  # the latency search's answer: the costliest point timed within the target
        timing = max((s for s in steps if s["feasible"]), key=lambda s: s["point"])["value"]
    else:  # an accuracy budget too: the chosen point was timed once, after the accuracy search
        timing = searched["latency_bound"]
    whole = " / ".join(f"{c.ratio:.3f}" for c in report.latency_check)
    slowest = max(c.ratio for c in report.latency_check)
    verdict = f"**missed** ({slowest:.3f})" if missed else "met"
    kept = report.dense_params_after / report.dense_params_before
    return [case.name, budget.describe(), quantize or "none", f"{kept:.1%}", f"{timing:.3f}", len(steps),
            whole, verdict, held_out_quality(report), f"{seconds:.0f}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if "minilm" in args.models and not minilm_built():
        return 1
    started, load = time.perf_counter(), os.getloadavg()[0]
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory(prefix="latency_target_") as folder:
        for key in args.models:
            case = CASES[key]
            with np.load(case.data) as archive:
                data = {name: archive[name] for name in archive.files}
            for number, (budget, quantize) in enumerate(case.budgets):
                output = Path(folder) / f"{key}_{number}.onnx"
                begun = time.perf_counter()
                try:
                    report, missed = compress_studied(case.model, output, budget=budget, data=data,
                                                      guard=LatencyGuard(batches=BATCHES), dims=case.dims,
                                                      quantize=quantize)
                except OutputError as error:  # no point searched is within the target
                    rows.append([case.name, budget.describe(), quantize or "none", "", "", "", "",
                                 f"**not met**: {error}", "", f"{time.perf_counter() - begun:.0f}"])
                    continue
                rows.append(_row(case, budget, quantize, report, missed, time.perf_counter() - begun))
    text = "\n".join([
        *header("Whole-model latency target (--target-latency)", __file__, argv, packages=MINILM_PACKAGES,
                notes=[f"load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end (shared 2-CPU machine)",
                       f"latency guard at batch {', '.join(map(str, BATCHES))} on CPU; each run split its data "
                       "60/40 (seed 0), every quality figure is on the held-out 40%",
                       f"wall time {time.perf_counter() - started:.0f} s"]),
        "",
        "`search's timing`: the chosen point's whole-model ratio as the search measured it, its 95% upper "
        "prediction bound at the slower batch size (with an accuracy budget too, the fastest point within it, "
        "timed once); `final timing`: "
        "`compress`'s own check of the written model, compressed / original median "
        "latency at batch 1 / 32, which decides met or missed; `steps`: candidates timed.",
        "",
        markdown_table(["model", "budget", "quantize", "dense params kept", "search's timing",
                        "steps", "final timing b1 / b32", "target", "held-out quality", "compress s"],
                       rows, "lrlrrrllll"),
    ])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
