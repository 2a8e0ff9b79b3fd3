"""Regenerate every committed result file in benchmarks/results/, one script after another.

Each script runs in its own process as ``python -m benchmarks.NAME`` from the repository root, so a run
leaves nothing behind for the next, with one BLAS thread for the SVDs unless the environment says otherwise
(onnxruntime keeps its own threads).
Installed versions that differ from ``benchmarks/constraints.txt`` are listed first: results made with
them are a different measurement. At the end a table gives each script's result files and wall time.

The wall times below were measured on this project's 2-CPU machines, shared with other jobs (the load
average is given), or are the ones the result files record; the others were not timed.
The MiniLM results need the export (``python models/build_minilm.py``).

Usage: python -m benchmarks.run_all [--only NAME ...] [--skip NAME ...] [--list]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import markdown_table, pinned_versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MINILM = ROOT / "models" / "build" / "minilm.onnx"


@dataclass(frozen=True)
class Script:
    """One benchmark script, the files it writes under benchmarks/results/, and how long it took."""

    name: str
    results: tuple[str, ...]
    wall_time: str
    minilm: bool = True
    """Whether its result covers the MiniLM export (without it, the script skips that part or stops)."""
    runs: tuple[tuple[str, ...], ...] = ((),)
    """The arguments of each run that writes its results (one run with none, by default)."""


SCRIPTS = (
    Script("mlp_table", ("mlp_table.md",), "37 s (load 8.7)", minilm=False),
    Script("budget_table", ("budget.md", "budget_digits.png", "budget_fashion.png"), "45 s (load 1.5)", minilm=False),
    Script("session_noise", ("session_noise.md",), "34 s (load 8.7)", minilm=False),
    Script("latency_table", ("latency.md",), "not timed: minutes (8 compressions, each benchmarked)"),
    Script("minilm_table", ("minilm_table.md",), "not timed: minutes (400 sentences scored per policy)"),
    Script("embedding_table", ("embedding.md",), "not timed: minutes (400 sentences scored per rank and method)"),
    Script("fusion_check", ("fusion.md",), "214 s (recorded in fusion.md)"),
    Script("compare_quantization", ("quantization.md",), "169 s (recorded in quantization.md)"),
    Script("subgraph_table", ("subgraph_table.md",), "6 s (load 6)", minilm=False),
    Script("factor_throughput", ("factor_throughput.md",), "not timed", minilm=False),
    Script("big_model", ("big_model.md", "big_model_full.md", "big_model_budget.md", "big_model_budget_full.md"),
           "minutes: 57 s at scale 0.5; at scale 1, four compress runs of 2-4 minutes each after building the "
           "2.3 GB model (load 2-4); the budgets: see their result files", minilm=False,
           runs=(("--scale", "0.5", "--jobs", "2"),
                 ("--scale", "1", "--jobs", "2", "--out", "benchmarks/results/big_model_full.md"),
                 ("--scale", "0.5", "--jobs", "2", "--budget", "--out", "benchmarks/results/big_model_budget.md"),
                 ("--scale", "1", "--jobs", "2", "--budget-only", "--out",
                  "benchmarks/results/big_model_budget_full.md"))),
    Script("session_memory", ("session_memory.md",), "about a minute (builds the 576 MiB model)", minilm=False),
    Script("rank_multiple", ("rank_multiple.md",), "17 s (load 1)", minilm=False),
    Script("frontier", ("frontier.md",), "60 s (load 1.5)", minilm=False),
    Script("latency_budget", ("latency_budget.md",), "781 s (load 1.7-1.9)"),
    Script("latency_target", ("latency_target.md",), "1111 s (load 1.4-1.7)"),
    Script("sequential", ("sequential.md",), "7 s (load 1.5)", minilm=False),
    Script("equal_params_transformers", ("equal_params_transformers.md",),
           "769 s (load 1.2-2.3; needs models/build_ppocr.py too)"),
    Script("ppocr_table", ("ppocr.md",), "600 s (load 1), two searches of under 3 min (needs models/build_ppocr.py)",
           minilm=False, runs=(("--budgets", "0.999,0.99", "--steps", "8", "--seconds", "4"),)),
    Script("minilm_curves", ("minilm_curves.md",), "not timed: minutes"),
    Script("response_samples", ("response_samples.md",), "about a minute (load 1)"),
    Script("minilm_quantization", ("minilm_quantization.md",), "290 s (load 1.4-1.6)",
           runs=(("--cosine", "0.98"),)),
    Script("minilm_budget", ("minilm_budget.md", "minilm_budget_responses.md", "minilm_budget_099.md"),
           "197 s for the three runs (load 1.1-1.4)",
           runs=((), ("--responses", "--out", "benchmarks/results/minilm_budget_responses.md"),
                 ("--cosine", "0.99", "--responses", "--quantize", "none", "--out",
                  "benchmarks/results/minilm_budget_099.md"))),
    Script("width_table", ("width_table.md", "width_table_mpnet.md"), "1384 s on MiniLM (load 1.2-1.6), 617 s on mpnet "
           "(needs models/build_mpnet.py)", runs=((), ("--model", "mpnet"))),
    Script("width_latency", ("width_latency.md",), "not timed: minutes (three narrowed models timed)"),
    Script("width_additivity", ("width_additivity.md",), "not timed: minutes (two search spaces built)"),
    Script("factor_rounding", ("factor_rounding.md",), "not timed: a minute (three budgets on the Fashion MLP)",
           minilm=False),
    Script("onnxsim_table", ("onnxsim_table.md",), "412 s (load 1.7-3.0); needs onnxsim 0.8.1 in a venv of its own "
           "(see the script): under this interpreter it stops, saying so"),
    Script("mpnet_table", ("mpnet_table.md",), "268 s with the tool's run reused, 2105 s for that run (load 1.4-6; "
           "needs models/build_mpnet.py)", minilm=False),
    Script("smollm2_table", ("smollm2_table.md",), "1612 s (load 1.5-3.0; needs models/build_smollm2.py)",
           minilm=False),
)


def version_mismatches() -> list[str]:
    """Each pinned package whose installed version differs from benchmarks/constraints.txt."""
    found = []
    for name, pinned in pinned_versions().items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed.split("+")[0] != pinned:  # 2.13.0+cpu is the build of torch 2.13.0 for the CPU
            found.append(f"{name} {installed} (constraints: {pinned})")
    return found


def run(script: Script) -> tuple[int, float]:
    """Exit status (the first failing run's) and wall seconds of each ``python -m benchmarks.NAME ARGS``,
    each in a fresh process."""
    environment = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", **os.environ}
    started, status = time.perf_counter(), 0
    for args in script.runs:
        completed = subprocess.run([sys.executable, "-m", f"benchmarks.{script.name}", *args], cwd=ROOT,
                                   env=environment, check=False)
        status = status or completed.returncode
    return status, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [s.name for s in SCRIPTS]
    parser.add_argument("--only", nargs="+", choices=names, default=names, metavar="NAME", help="run only these")
    parser.add_argument("--skip", nargs="+", choices=names, default=[], metavar="NAME", help="leave these out")
    parser.add_argument("--list", action="store_true", help="list the scripts and what they write, run nothing")
    args = parser.parse_args(argv)
    chosen = [s for s in SCRIPTS if s.name in args.only and s.name not in args.skip]
    if args.list:
        print(markdown_table(["script", "writes (benchmarks/results/)", "wall time", "needs MiniLM"],
                             [(f"python -m benchmarks.{s.name}", ", ".join(s.results), s.wall_time,
                               "yes" if s.minilm else "no") for s in chosen]))
        return 0
    for mismatch in version_mismatches():
        print(f"version differs from benchmarks/constraints.txt: {mismatch}", file=sys.stderr)
    if not MINILM.exists() and any(s.minilm for s in chosen):
        print(f"{MINILM} missing (python models/build_minilm.py): MiniLM results would be left out or fail",
              file=sys.stderr)
    rows, failed = [], 0
    for script in chosen:
        print(f"== python -m benchmarks.{script.name} (took {script.wall_time} before)", flush=True)
        status, seconds = run(script)
        failed += status != 0
        rows.append((script.name, ", ".join(script.results), f"{seconds:.0f} s", script.wall_time,
                     "ok" if status == 0 else f"FAILED ({status})"))
    print(markdown_table(["script", "wrote", "wall time", "before", "status"], rows, "llrll"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
