"""Memory of one onnxruntime session on a model loaded in memory, by how the model reaches onnxruntime.

Builds the transformer-shaped model of ``big_model.py`` (external data, never in git) and an inline
copy, then, for each, in a fresh child process: loads it with onnx-arsvd's loader (weights memory-
mapped, as the budget search holds it) and opens a session (1) from the file's path, (2) through
``sessions.model_session`` (the graph serialized, external data left to onnxruntime), (3) from
``ir.to_proto(model).SerializeToString()``, as budget candidates were before, run from the model's
folder (the proto keeps relative external-data references, which onnxruntime resolves against the
working folder for a model given as bytes). Reports the child's resident memory (VmRSS) after loading,
with the session open, after one run, after closing it, and its peak (VmHWM).

Usage: python -m benchmarks.session_memory [--scale 0.5] [--blocks 16] [--out benchmarks/results/session_memory.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx

from benchmarks.big_model import build, files_bytes
from benchmarks.results_io import package_versions, write_result

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "session_memory.md"
BUILD = ROOT / "build" / "session_memory"
MODES = {
    "path": "onnxruntime from the file's path",
    "model_session": "`model_session(model)`: graph and in-memory tensors serialized, external data mapped by "
                     "onnxruntime from its folder",
    "serialized": "`ir.to_proto(model).SerializeToString()`, from the model's folder (the search before "
                  "`model_session`: external data stays a relative reference, found only from that folder)",
}


def _resident_mib(field: str = "VmRSS:") -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024


def child(mode: str, path: Path) -> None:
    """One measurement, printed as a Markdown row (run in its own process)."""
    import onnx_ir as ir

    from onnx_arsvd.io.models import load_model
    from onnx_arsvd.measure.sessions import make_session, model_session

    model = load_model(path)
    loaded = _resident_mib()
    if mode == "path":
        session = make_session(path)
    elif mode == "model_session":
        session = model_session(model)[0]
    else:
        session = make_session(ir.to_proto(model).SerializeToString())
    opened = _resident_mib()
    hidden = session.get_inputs()[0].shape[-1]
    session.run(None, {"X": np.ones((2, 16, hidden), np.float32)})
    ran = _resident_mib()
    del session
    closed = _resident_mib()
    peak = _resident_mib("VmHWM:")  # this process's own high-water mark (ru_maxrss outlives exec on Linux)
    print(f"| {MODES[mode]} | {loaded:.0f} | {opened:.0f} | {ran:.0f} | {closed:.0f} | {peak:.0f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.5, help="hidden size 2048 x scale (default 0.5: 576 MiB)")
    parser.add_argument("--blocks", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.model)
        return 0
    shutil.rmtree(BUILD, ignore_errors=True)
    model = build(BUILD, args.blocks, int(round(2048 * args.scale)))
    size = files_bytes(model) / 2**20
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    inline = BUILD / "inline.onnx"
    onnx.save_model(onnx.load(model), inline)  # the same weights inside the file
    rows = []
    for label, path in (("external data", model), ("weights inline", inline)):
        rows += [f"| {label} | " + subprocess.run(
            [sys.executable, "-m", "benchmarks.session_memory", "--child", mode, "--model", str(path)], env=env,
            cwd=BUILD if mode == "serialized" else ROOT, check=True, capture_output=True, text=True).stdout.strip()[2:]
            for mode in MODES]
    shutil.rmtree(BUILD, ignore_errors=True)
    text = "\n".join([
        "# One onnxruntime session: resident memory by how the model is handed over",
        "",
        f"- command: `python -m benchmarks.session_memory --scale {args.scale:g} --blocks {args.blocks}`; "
        f"date: {datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%S+00:00}",
        f"- {package_versions()}; CPU provider, default options (prepacking on)",
        f"- model: `big_model.py`'s transformer shape, {args.blocks} blocks, {size:.0f} MiB of fp32 weights, in "
        "external data and inline; each row a fresh process that loads it with onnx-arsvd's loader (external "
        "data memory-mapped) before the session opens",
        "",
        "| model | session from | MiB after loading | with the session open | after one run | after closing | peak |",
        "|---|---|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
