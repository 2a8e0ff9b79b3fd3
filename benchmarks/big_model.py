"""Compress a transformer-shaped fp32 model with external data, built at run time: time, CPU, memory, size.

The model (never in git; written under ``build/big_model/``, which .gitignore ignores) is ``--blocks``
blocks of X += X @ W_attn; X += Relu(X @ W_up) @ W_down with W_attn h x h, W_up h x 4h, W_down 4h x h,
h = 2048 x ``--scale``: at scale 1 and 16 blocks, 2.4 GB of weights in ``big.onnx.data``. Every weight has a
power-law spectrum (s_i ~ i^-0.5, mixed by Gaussian matrices) plus noise, like trained weights. Then
``onnx-arsvd compress`` runs in a child process per configuration (:data:`RUNS`: ``--ratio 0.25`` and
``--ratio 0.5`` without verification, and ``--ratio 0.25`` verified on generated inputs, both models side
by side and one at a time; each ``--src``
given runs the first one too, e.g. another checkout's package, for a before/after), and the script
reports its wall time, CPU time (user + system of the child), peak resident memory (the child's
ru_maxrss, from wait4: file pages mapped and read count too) and the output's size.

Usage: python -m benchmarks.big_model [--scale 0.25] [--blocks 16] [--jobs 2] [--src /other/checkout]
       [--out benchmarks/results/big_model.md] [--keep]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
from onnx import TensorProto, helper

from benchmarks.results_io import package_versions, write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "big_model.md"
BUILD = ROOT / "build" / "big_model"


def power_law_weight(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 m x n, spectrum ~ i^-0.5 plus 1% noise, spectral norm about 0.5 (activations stay bounded)."""
    r = min(m, n)
    s = (0.5 * np.arange(1, r + 1) ** -0.5).astype(np.float32)
    left = rng.standard_normal((m, r), dtype=np.float32) * np.float32(1 / np.sqrt(m))
    right = rng.standard_normal((r, n), dtype=np.float32) * np.float32(1 / np.sqrt(n))
    noise = rng.standard_normal((m, n), dtype=np.float32) * np.float32(0.005 / np.sqrt(n))
    return ((left * s) @ right + noise).astype(np.float32)


def build(folder: Path, blocks: int, hidden: int, seed: int = 0) -> Path:
    """Write the model and its external data one weight at a time (never the whole model in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    path, data = folder / "big.onnx", folder / "big.onnx.data"
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    current = "X"
    with data.open("wb") as sink:
        for b in range(blocks):
            shapes = (("attn", (hidden, hidden)), ("up", (hidden, 4 * hidden)), ("down", (4 * hidden, hidden)))
            for name, (m, n) in shapes:
                weight = power_law_weight(m, n, rng)
                offset = sink.tell()
                sink.write(weight.tobytes())
                sink.write(b"\0" * (-sink.tell() % 4096))  # page-aligned, so every weight can be memory-mapped
                tensor = TensorProto(name=f"block{b}.{name}", dims=[m, n], data_type=TensorProto.FLOAT,
                                     data_location=TensorProto.EXTERNAL)
                for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(weight.nbytes))):
                    tensor.external_data.add(key=key, value=value)
                initializers.append(tensor)
            nodes += [
                helper.make_node("MatMul", [current, f"block{b}.attn"], [f"a{b}"], name=f"block{b}/attn"),
                helper.make_node("Add", [current, f"a{b}"], [f"x{b}"]),
                helper.make_node("MatMul", [f"x{b}", f"block{b}.up"], [f"u{b}"], name=f"block{b}/up"),
                helper.make_node("Relu", [f"u{b}"], [f"r{b}"]),
                helper.make_node("MatMul", [f"r{b}", f"block{b}.down"], [f"d{b}"], name=f"block{b}/down"),
                helper.make_node("Add", [f"x{b}", f"d{b}"], [f"y{b}"]),
            ]
            current = f"y{b}"
    nodes[-1].output[0] = "Y"
    graph = helper.make_graph(nodes, "big",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", hidden])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", hidden])],
                              initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def files_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


RUNS = (
    ("--ratio 0.25, --no-verify", ["--policy", "ratio", "--ratio", "0.25", "--no-verify"]),
    ("--ratio 0.5, --no-verify", ["--policy", "ratio", "--ratio", "0.5", "--no-verify"]),
    ("--ratio 0.25, verified (2 generated batches)", ["--policy", "ratio", "--ratio", "0.25", "--samples", "2"]),
    ("--ratio 0.25, verified one model at a time", ["--policy", "ratio", "--ratio", "0.25", "--samples", "2",
                                                    "--one-at-a-time"]),
)
"""Label and compress options of each run of this checkout's package."""

IMPORTS_ONLY = ["-c", "import onnx_arsvd.api, onnx_arsvd.numerics.factorize, threadpoolctl"]


def build_in_child(folder: Path, blocks: int, hidden: int) -> Path:
    """:func:`build` in its own process. A child's peak RSS (ru_maxrss) starts from its parent's peak on
    Linux (it survives the fork and exec), so this process must never hold the model-sized arrays that
    building makes; before, the constant part varied from 174 to 476 MiB with the scale."""
    code = (f"from pathlib import Path; from benchmarks.big_model import build; "
            f"build(Path({os.fspath(folder)!r}), {blocks}, {hidden})")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return folder / "big.onnx"


def child(arguments: list[str], src: Path) -> dict[str, float]:
    """Run python with ``src``'s package in a fresh process; its wall and CPU seconds, peak RSS bytes, exit status."""
    command = [sys.executable, *arguments]
    env = dict(os.environ, PYTHONPATH=str(src))
    start = time.perf_counter()
    # run outside any checkout: ``python -m`` puts the working folder first on sys.path, before PYTHONPATH
    process = subprocess.Popen(command, env=env, cwd=BUILD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    error = process.stderr.read().decode().strip()
    process.stderr.close()
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss * 1024.0,
            "status": os.waitstatus_to_exitcode(status), "error": error.splitlines()[-1] if error else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0,
                        help="hidden size 2048 x scale (default 1: 2.4 GB at 16 blocks)")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--jobs", type=int, help="passed to compress --jobs")
    parser.add_argument("--src", action="append", default=[], type=Path,
                        help="also run the package from this checkout (repeatable), e.g. the main branch")
    parser.add_argument("--keep", action="store_true", help="keep build/big_model/ afterwards")
    parser.add_argument("--budget", action="store_true",
                        help="also run a data-driven budget: --target-params 0.25 with 64 generated activations "
                             "(whitened factors from 19 of them, layer responses on 19 others, verified on the 26 "
                             "held out)")
    parser.add_argument("--budget-only", action="store_true", help="run the budget alone, not the --ratio runs")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    hidden = int(round(2048 * args.scale))
    shutil.rmtree(BUILD, ignore_errors=True)
    start = time.perf_counter()
    model = build_in_child(BUILD, args.blocks, hidden)
    built = time.perf_counter() - start
    size = files_bytes(model)
    rows = []
    load_before = os.getloadavg()
    runs = [] if args.budget_only else ([(ROOT, label, options) for label, options in RUNS]
                                        + [(src, RUNS[0][0], RUNS[0][1]) for src in args.src])
    if args.budget or args.budget_only:  # inputs of a realistic scale: the blocks keep activations bounded
        data = BUILD / "inputs.npz"
        np.savez(data, X=np.random.default_rng(1).standard_normal((64, 16, hidden)).astype(np.float32))
        runs.append((ROOT, "--target-params 0.25 --data (64 generated inputs, 40% held out)",
                     ["--target-params", "0.25", "--data", str(data)]))
    for src, what, options in runs:
        output = BUILD / f"out_{len(rows)}" / "small.onnx"
        output.parent.mkdir(parents=True, exist_ok=True)
        jobs = ["--jobs", str(args.jobs)] if args.jobs and src == ROOT else []
        result = child(["-m", "onnx_arsvd", "compress", str(model), "-o", str(output), *options, "-q", *jobs], src)
        out_size = files_bytes(output) if result["status"] == 0 else 0
        label = ("this checkout" if src == ROOT else os.fspath(src)) + f", {what}" + (f", --jobs {args.jobs}" if jobs
                                                                                       else "")
        rows.append(f"| {label} | {result['status']} | {result['wall']:.1f} | {result['cpu']:.1f} | "
                    f"{result['rss'] / 2**20:.0f} ({result['rss'] / size:.2f}x) | {out_size / 2**20:.0f} "
                    f"({out_size / size:.2f}x) | {result['error'] if result['status'] else ''} |")
        shutil.rmtree(output.parent, ignore_errors=True)
    imports = child(IMPORTS_ONLY, ROOT)
    rows.append(f"| imports only (the constant part) | {imports['status']} | {imports['wall']:.1f} | "
                f"{imports['cpu']:.1f} | "
                f"{imports['rss'] / 2**20:.0f} | | |")
    load_after = os.getloadavg()
    if not args.keep:
        shutil.rmtree(BUILD, ignore_errors=True)
    text = "\n".join([
        "# Compressing a transformer-shaped fp32 model with external data",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{package_versions()}; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after (a shared "
        f"machine: wall times include other people's work). Command: `python benchmarks/big_model.py --scale "
        f"{args.scale:g} --blocks {args.blocks}" + (f" --jobs {args.jobs}" if args.jobs else "")
        + "".join(f" --src {s}" for s in args.src) + (" --budget" if args.budget else "")
        + (" --budget-only" if args.budget_only else "")
        + (f" --out {os.path.relpath(args.out, ROOT)}" if args.out != DEFAULT_OUT else "") + "`",
        "",
        f"Model: {args.blocks} blocks of {hidden}x{hidden}, {hidden}x{4 * hidden}, {4 * hidden}x{hidden} fp32 weights "
        f"(power-law spectra plus noise), {size / 2**20:.0f} MiB with external data, built in {built:.0f} s. "
        + ("" if args.budget_only else "Each run: `onnx-arsvd compress MODEL -o OUT --policy ratio --ratio R "
                                          "[--no-verify | --samples 2 [--one-at-a-time]] -q` in a child process")
        + (("; and" if not args.budget_only else "The run:") + " `onnx-arsvd compress MODEL -o OUT --target-params "
           "0.25 --data inputs.npz -q` in a child process (the data-driven budget: whitened factors, verified on the "
           "held-out part)." if args.budget or args.budget_only else "."),
        "",
        "| run | exit | wall s | CPU s | peak RSS MiB (x model) | output MiB (x model) | error |",
        "|---|---:|---:|---:|---:|---:|---|",
        *rows,
        "",
    ])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
