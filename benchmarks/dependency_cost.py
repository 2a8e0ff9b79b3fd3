"""What scikit-learn costs as a core dependency: installed size and import time of what the solver imports.

Installed size is the sum of the files each distribution's RECORD lists (scikit-learn, joblib,
threadpoolctl, and scipy for comparison). Import time is the wall time of a fresh interpreter that
imports the module, minus that of one that imports nothing, median of ``--repeats`` interleaved runs;
``onnx_arsvd`` and ``onnx_arsvd.factorize`` show that the package itself does not pay it until a weight
uses the randomized solver.

Usage: python -m benchmarks.dependency_cost [--repeats 5] [--out benchmarks/results/dependency_cost.md]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from importlib.metadata import distribution
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import header, write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "dependency_cost.md"
MODULES = ("onnx_arsvd", "onnx_arsvd.factorize", "threadpoolctl", "sklearn.utils.extmath", "scipy.linalg")


def installed_bytes(name: str) -> int:
    dist = distribution(name)
    return sum(os.path.getsize(path) for file in dist.files or () if os.path.isfile(path := dist.locate_file(file)))


def import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}" if module else "pass"], check=True,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {module: [] for module in ("", *MODULES)}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for module in times:
            times[module].append(import_seconds(module))
    base = statistics.median(times[""])
    sizes = [f"| {name} | {installed_bytes(name) / 2**20:.1f} |" for name in ("scikit-learn", "joblib", "threadpoolctl",
                                                                              "scipy")]
    imports = [f"| `import {module}` | {statistics.median(times[module]) - base:.2f} |" for module in MODULES]
    text = "\n".join([
        *header("What scikit-learn costs as a dependency", "dependency_cost", argv,
                packages=("onnxruntime", "scikit-learn", "scipy", "numpy"),
                notes=[f"load average at start {load_before[0]:.1f} (a shared machine)"]),
        "",
        "| distribution | installed MiB |",
        "|---|---:|",
        *sizes,
        "",
        f"Import time in a fresh interpreter, minus an empty one ({base:.2f} s), median of {args.repeats}:",
        "",
        "| module | seconds |",
        "|---|---:|",
        *imports,
        "",
    ])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
