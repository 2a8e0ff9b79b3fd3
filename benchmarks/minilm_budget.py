"""The budget search on all-MiniLM-L6-v2: ``--min-cosine C [--quantize Q]`` on the 200 polarity sentences.

40% of the sentences are held out (seed 0). The cosine is that of each sentence's whole
``last_hidden_state`` with the original's (the tool's verification measure, stricter than the
mean-pooled sentence embedding). Layer responses are measured only with ``--responses`` (two probes
for each of 36 weights cost several minutes on this machine); without, layers' losses are their
relative output errors (the CLI measures them: ``--responses --quantize none`` is what
``onnx-arsvd compress --min-cosine C --data polarity.npz`` does). Prints the report: the search steps,
the held-out frontier (original, quantization alone, factored, factored + quantized) and the wall time.

Usage: python benchmarks/minilm_budget.py [--cosine 0.985] [--responses] [--quantize int8|int4|int8+int4-tables|none]
       [--out benchmarks/results/minilm_budget.md]
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



from benchmarks.results_io import compress_studied, package_versions, write_result
from benchmarks.text_eval import MINILM, load_text_set, minilm_built
from onnx_arsvd import format_report
from onnx_arsvd.methods.quantize.configs import QUANTIZERS
from onnx_arsvd.search.budget import Budget

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "minilm_budget.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cosine", type=float, default=0.985)
    parser.add_argument("--responses", action="store_true", help="measure each layer's end-to-end response")
    parser.add_argument("--quantize", default="int8", choices=[*QUANTIZERS, "none"],
                        help="quantization inside the search (default int8; none: factoring alone)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not minilm_built():
        return 1
    feed, _ = load_text_set("polarity")
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="minilm_budget_") as folder:
        budget = Budget(min_cosine=args.cosine, sensitivity=args.responses)
        quantize = None if args.quantize == "none" else args.quantize
        report, _ = compress_studied(MINILM, Path(folder) / "small.onnx", budget=budget, data=feed, quantize=quantize)
    seconds = time.perf_counter() - started
    text = "\n".join([
        f"# Budget search on all-MiniLM-L6-v2: --min-cosine {args.cosine:g}"
        + (f" --quantize {quantize}" if quantize else "") + (" (layer responses measured)" if args.responses else ""),
        "",
        f"- command: `python benchmarks/minilm_budget.py --cosine {args.cosine:g}"
        f"{' --responses' if args.responses else ''}{f' --quantize {args.quantize}' if args.quantize != 'int8' else ''}"
        f"{f' --out {args.out}' if args.out != DEFAULT_OUT else ''}`;"
        f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average {load:.1f} at start and"
        f" {os.getloadavg()[0]:.1f} at end (shared with other jobs); {package_versions()}",
        "- wall time of the whole compress call (calibration, curves, search, frontier, verification):"
        f" {seconds:.0f} s",
        "", "```", format_report(report), "```"])
    write_result(text + "\n", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
