"""ARSVD against INT8 and INT4 alone on a real vision transformer: PP-OCRv6 text recognition, on real text lines.

The model and lines come from ``models/build_ppocr.py`` (``PP-OCRv6_rec_small.onnx`` from the ``rapidocr``
wheel; 120 calibration lines, 87 test lines: 80 printed lines of real review text and 7 lines of a real
photographed page). Variants, each written to a temporary folder:

* INT8 alone: ``onnxruntime.quantization.quantize_dynamic``, signed per-channel weights, ``reduce_range=True``,
  as users call it (it quantizes the convolutions too), and restricted to ``MatMul`` (what onnx-arsvd touches).
* INT4 alone: onnxruntime's ``MatMulNBitsQuantizer`` (weight-only, symmetric, block 32).
* onnx-arsvd at two budgets, ``compress(..., budget=Budget(min_cosine=C), data=calibration lines)``, through
  the public API (the tool splits the calibration lines itself; the test lines are never seen), then each
  of those with INT8 (MatMul only) and with INT4 applied on top.

On the test lines, for every variant: the per-line output cosine with the original (the whole
``[time, 18710]`` probability map, mean and minimum), the decoded text (RapidOCR's own ``CTCLabelDecode``
with the model's character list) against the ground truth (exact lines and character accuracy,
whitespace ignored, since CTC spacing is not what is being measured), the lines whose text differs from
the original model's, the file size, and the latency ratio to the original at batch 1 (one 48 x 832
line), the median of interleaved pairs over 3 rounds of fresh single-thread sessions.

Usage: python benchmarks/ppocr_table.py [--out FILE.md] [--budgets 0.999,0.99] [--steps 12] [--seconds 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx

from benchmarks.results_io import PACKAGES, compress_studied, package_versions, write_result
from onnx_arsvd import Budget
from onnx_arsvd.io.models import model_file_bytes
from onnx_arsvd.measure.benchmark import compare_latency, timed_rounds
from onnx_arsvd.measure.sessions import make_session

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "models" / "build"
MODEL = BUILD / "ppocr_rec.onnx"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ppocr.md"
BATCH = 8


@dataclass
class Scores:
    cosine_mean: float
    cosine_min: float
    exact: int
    photo_exact: int
    char_accuracy: float
    changed: int


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def decoder(model: Path):
    from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode

    metadata = {p.key: p.value for p in onnx.load(model, load_external_data=False).metadata_props}
    return CTCLabelDecode(character=metadata["character"].splitlines())


def run(model: Path, x: np.ndarray) -> np.ndarray:
    session = make_session(model, threads=1)
    return np.concatenate([session.run(None, {"x": x[i:i + BATCH]})[0] for i in range(0, len(x), BATCH)])


def score(outputs: np.ndarray, reference: np.ndarray, texts: list[str], reference_texts: list[str],
          truth: list[dict[str, str]]) -> Scores:
    a = reference.reshape(len(reference), -1).astype(np.float64)
    b = outputs.reshape(len(outputs), -1).astype(np.float64)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    squeeze = [t.replace(" ", "") for t in texts]
    gold = [line["text"].replace(" ", "") for line in truth]
    exact = [s == g for s, g in zip(squeeze, gold, strict=True)]
    errors = sum(edit_distance(s, g) for s, g in zip(squeeze, gold, strict=True))
    return Scores(
        cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()), exact=sum(exact),
        photo_exact=sum(e for e, line in zip(exact, truth, strict=True) if line["source"] == "photo"),
        char_accuracy=1.0 - errors / sum(len(g) for g in gold),
        changed=sum(t != r for t, r in zip(texts, reference_texts, strict=True)),
    )


def int8(source: Path, target: Path, matmul_only: bool = False) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, target, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul"] if matmul_only else None)
    return target


def int4(source: Path, target: Path) -> Path:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=True)
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--budgets", default="0.999,0.99", help="min-cosine budgets for onnx-arsvd, comma-separated")
    parser.add_argument("--steps", type=int, default=12, help="bisection steps per budget search (tool default)")
    parser.add_argument("--seconds", type=float, default=4.0, help="latency: interleaved seconds per variant")
    args = parser.parse_args(argv)
    if not MODEL.exists():
        print(f"{MODEL} is missing: run python models/build_ppocr.py first", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic warns through the root logger on every call
    budgets = [float(b) for b in args.budgets.split(",")]
    with np.load(BUILD / "ppocr_calibration.npz") as archive:
        calibration = {"x": archive["x"]}
    with np.load(BUILD / "ppocr_test.npz") as archive:
        x = archive["x"]
    truth = json.loads((BUILD / "ppocr_test.json").read_text(encoding="utf-8"))
    decode = decoder(MODEL)
    log(f"original on {len(x)} test lines")
    reference = run(MODEL, x)
    reference_texts = [t for t, _ in decode(reference)[0]]
    rows: list[list[str]] = []
    search: list[str] = []
    original_bytes = model_file_bytes(MODEL)
    feed = {"x": x[-1:]}  # one photo line, 48 x 832
    with tempfile.TemporaryDirectory(prefix="ppocr_table_") as tmp:
        work = Path(tmp)
        variants: list[tuple[str, Path]] = [
            ("original", MODEL), ("INT8 alone (Conv and MatMul)", int8(MODEL, work / "int8.onnx")),
            ("INT8 alone, MatMul only", int8(MODEL, work / "int8_matmul.onnx", matmul_only=True)),
            ("INT4 alone (MatMulNBits, block 32)", int4(MODEL, work / "int4.onnx"))]
        for cosine in budgets:
            log(f"compress, budget min cosine {cosine:g}")
            started = time.perf_counter()
            path = work / f"arsvd_{cosine:g}.onnx"
            report, missed = compress_studied(MODEL, path, budget=Budget(min_cosine=cosine, steps=args.steps),
                                              data=calibration)
            seconds = time.perf_counter() - started
            (output,) = report.verification.outputs
            factored = [f"{layer.name} {layer.rank}" for layer in report.layers if layer.factored]
            tau = report.budget.get("tau") if report.budget else None
            chosen = f"tau {tau:.4f}" if tau is not None else report.policy
            search.append(f"| {cosine:g}{' (MISSED on held-out)' if missed else ''} | {chosen} | "
                          f"{report.factored}/{len(report.layers)} | "
                          f"{report.dense_params_after / report.dense_params_before:.1%} | "
                          f"{output.mean_cosine:.4f} / {output.min_cosine:.4f} | {seconds:.0f} s | "
                          f"{', '.join(factored) or 'none'} |")
            variants += [(f"onnx-arsvd, min cosine {cosine:g}", path),
                         (f"onnx-arsvd {cosine:g} + INT8 (MatMul only)",
                          int8(path, work / f"arsvd_{cosine:g}_int8.onnx", matmul_only=True)),
                         (f"onnx-arsvd {cosine:g} + INT4", int4(path, work / f"arsvd_{cosine:g}_int4.onnx"))]
        for label, path in variants:
            log(f"scoring {label}")
            outputs = reference if path == MODEL else run(path, x)
            texts = [t for t, _ in decode(outputs)[0]]
            s = score(outputs, reference, texts, reference_texts, truth)
            if path == MODEL:
                latency = "1"
            else:
                rounds = timed_rounds(MODEL, path, feed, threads=1, rounds=3, min_seconds=args.seconds, min_runs=10)
                comparison = compare_latency("CPUExecutionProvider", 1, rounds)
                latency = f"{comparison.ratio:.2f} ({comparison.ratio_p10:.2f}-{comparison.ratio_p90:.2f})"
            size = model_file_bytes(path)
            rows.append([label, f"{size:,} ({size / original_bytes:.3f}x)", latency,
                         f"{s.cosine_mean:.4f} / {s.cosine_min:.4f}", f"{s.exact}/{len(truth)}",
                         f"{s.photo_exact}/{sum(line['source'] == 'photo' for line in truth)}",
                         f"{s.char_accuracy:.2%}", str(s.changed)])
            del outputs
    headers = ["model", "file bytes (x original)", "latency ratio, batch 1 (p10-p90)", "output cosine mean / min",
               "exact lines", "of which photo", "character accuracy", "lines that differ from the original's"]
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    versions = package_versions((*PACKAGES, "rapidocr"))
    text = "\n".join([
        "# PP-OCRv6 text recognition (SVTR vision transformer): onnx-arsvd against INT8 and INT4 alone",
        "",
        f"- command: `python benchmarks/ppocr_table.py --budgets {args.budgets} --steps {args.steps}"
        f" --seconds {args.seconds:g}`;"
        f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at the end {load}"
        f" (shared: latency ratios are interleaved pairs, absolute times are not shown); versions: {versions}",
        f"- model: `PP-OCRv6_rec_small.onnx` from the rapidocr {version('rapidocr')} wheel, {original_bytes:,} bytes,"
        " 9 MatMul weights (8 in two SVTR blocks, 120x120 to 240x120, and the 120 x 18710 CTC head)",
        f"- test: {len(truth)} lines never used for calibration ({sum(t['source'] == 'printed' for t in truth)} printed"
        f" lines of real review text, {sum(t['source'] == 'photo' for t in truth)} lines of a real photograph);"
        f" onnx-arsvd searched on the {len(calibration['x'])} calibration lines (its own 40% hold-out inside)",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "The budget searches (`compress(..., budget=Budget(min_cosine=C), data=calibration lines)`); the cosine is"
        " the tool's own held-out report, on 48 of the calibration lines:",
        "",
        "| budget | chosen by | factored | dense params kept | held-out cosine mean / min | search time | ranks |",
        "|---:|---:|---:|---:|---:|---:|---|",
        *search,
    ]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
