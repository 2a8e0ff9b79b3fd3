"""onnx-arsvd vs onnxruntime's dynamic INT8 quantization, and both combined (SVD, then INT8).

For each model (``models/digits_mlp.onnx``, ``models/fashion_mlp.onnx`` and, when built,
``models/build/minilm.onnx``) this writes these variants and measures each one:

* the original;
* SVD with onnx-arsvd's energy policy (tau 0.9 and 0.8 on the MLPs, 0.9 on MiniLM: at 0.95 nothing
  in MiniLM is factored);
* ``onnxruntime.quantization.quantize_dynamic`` INT8, signed per-channel weights with
  ``reduce_range=True`` (7-bit weights: the safe setting on AVX2 CPUs without VNNI);
* SVD tau 0.9, then the same INT8 quantization;
* SVD tau 0.9, then INT8 signed per-channel *without* ``reduce_range``: the unsafe setting, shown once
  per model so the reader sees what it changes on this CPU.

Measured per variant: file bytes (model plus external data) and the ratio to the original; latency at
each batch size, timed interleaved against the original (one pair of sessions live at a time, thread
spinning off) as a median in ms and as the variant/original ratio with its p10-p90 over the pairs;
accuracy and macro-F1 on the shipped test split (MLPs), or sentence-embedding cosine with the original
and a linear-probe accuracy on real text (MiniLM). A second table per model lists the MatMul-like and
quantization ops in each file and after onnxruntime's graph optimizations, which shows what
``quantize_dynamic`` did to the factored MatMul pairs.

Usage: python -m benchmarks.compare_quantization [--models digits fashion minilm] [--seconds 2]
       [--threads 0] [--pairs 10] [--batches 1 32] [--out benchmarks/results/quantization.md]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic

from benchmarks.results_io import PACKAGES, write_result
from benchmarks.results_io import header as common_header
from onnx_arsvd import EnergyPolicy, compress
from onnx_arsvd.io.data import load_data, split_batches
from onnx_arsvd.io.models import model_file_bytes
from onnx_arsvd.measure.benchmark import compare_latency, latency_stats, timed_rounds
from onnx_arsvd.measure.results import LatencyComparison
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.measure.verification import compare_models

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MINILM = MODELS / "build" / "minilm.onnx"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quantization.md"
ALL_MODELS = ("digits", "fashion", "minilm")
TEXT_SETS = ("polarity", "newsgroups")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MINILM_SEQ = 128  # latency feeds: newsgroups rows at the length they were tokenized to (padded to 128)
COMBINED_TAU = 0.9
WARMUP = 3  # untimed calls of each session before timing (MiniLM at batch 32 takes about 0.4 s a call)
PROVIDER = "CPUExecutionProvider"
SAFE, UNSAFE = "safe", "unsafe"  # INT8 settings: per-channel signed weights with / without reduce_range
QUANT_SETTINGS = {SAFE: {"per_channel": True, "reduce_range": True},
                  UNSAFE: {"per_channel": True, "reduce_range": False}}
INT8_FLAGS = ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
OP_PATTERN = re.compile(r"matmul|gemm|quantiz|attention", re.IGNORECASE)
_STARTED = time.perf_counter()  # for the progress log  # the ops worth listing in the op table


@dataclass(frozen=True)
class Variant:
    """One model file to measure: SVD at ``tau`` (or none), then INT8 with ``quant`` settings (or none)."""

    tau: float | None = None
    quant: str | None = None  # SAFE, UNSAFE or None (no INT8)

    @property
    def label(self) -> str:
        parts = [f"SVD τ={self.tau:g}"] if self.tau is not None else []
        if self.quant is not None:
            settings = "per-channel, reduce_range" if self.quant == SAFE else "per-channel, no reduce_range: unsafe"
            parts.append(f"INT8 ({settings})")
        return " + ".join(parts) or "original"

    @property
    def slug(self) -> str:
        tau = f"svd{self.tau:g}" if self.tau is not None else "dense"
        quant = "" if self.quant is None else ("_int8rr" if self.quant == SAFE else "_int8")
        return tau + quant


ORIGINAL = Variant()


def mlp_variants() -> list[Variant]:
    return [ORIGINAL, Variant(0.9), Variant(0.8), Variant(quant=SAFE), Variant(COMBINED_TAU, SAFE),
            Variant(COMBINED_TAU, UNSAFE)]


def minilm_variants() -> list[Variant]:
    return [ORIGINAL, Variant(0.9), Variant(quant=SAFE), Variant(COMBINED_TAU, SAFE), Variant(COMBINED_TAU, UNSAFE)]


@dataclass
class Measured:
    """Everything measured for one variant of one model."""

    variant: Variant
    path: Path
    weights: str  # ranks per layer, or "dense"
    file_bytes: int
    latency: dict[int, LatencyComparison] = field(default_factory=dict)
    scores: list[str] = field(default_factory=list)  # the model kind's quality cells
    ops_file: Counter = field(default_factory=Counter)
    ops_runtime: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class Timing:
    """How sessions are made and how long each case is timed."""

    threads: int  # intra-op threads, 0 = onnxruntime default
    seconds: float  # at least this long per variant and batch size
    pairs: int  # and at least this many interleaved pairs


def log(message: str) -> None:
    print(f"{time.perf_counter() - _STARTED:6.1f}s {message}", file=sys.stderr, flush=True)


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """quantize_dynamic warns through the root logger on every call (about pre-processing): hide that."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --- building the variants -------------------------------------------------------------------


def build_variants(source: Path, variants: Sequence[Variant], workdir: Path) -> dict[Variant, tuple[Path, str]]:
    """Write every variant; SVD files are shared by the variants that quantize them."""
    svd: dict[float, tuple[Path, str]] = {}
    built: dict[Variant, tuple[Path, str]] = {}
    for variant in variants:
        base, weights = source, "dense"
        if variant.tau is not None:
            if variant.tau not in svd:
                path = workdir / f"{source.stem}_svd{variant.tau:g}.onnx"
                _, report = compress(source, path, policy=EnergyPolicy(variant.tau), check=False, factor_heads=True)
                svd[variant.tau] = (path, ranks(report))
            base, weights = svd[variant.tau]
        if variant.quant is not None:
            path = workdir / f"{source.stem}_{variant.slug}.onnx"
            with quiet_root_logger():
                quantize_dynamic(base, path, weight_type=QuantType.QInt8, **QUANT_SETTINGS[variant.quant])
            base = path
        built[variant] = (base, weights)
    return built


def ranks(report) -> str:
    if len(report.layers) <= 4:
        return "/".join(f"{layer.rank}{'' if layer.factored else '*'}" for layer in report.layers)
    return f"{report.factored}/{len(report.layers)} factored"


def op_counts(path: Path, threads: int, workdir: Path) -> tuple[Counter, Counter]:
    """Op types in the file, and in the graph onnxruntime runs after its optimizations (CPU, level ALL)."""
    in_file = Counter(node.op_type for node in onnx.load(path, load_external_data=False).graph.node)
    optimized = workdir / f"{path.stem}.ort-optimized.onnx"
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), options, providers=[PROVIDER])
    del session
    runtime = Counter(node.op_type for node in onnx.load(optimized, load_external_data=False).graph.node)
    for leftover in workdir.glob(f"{optimized.name}*"):
        leftover.unlink()
    return in_file, runtime


def show_ops(counts: Counter) -> str:
    shown = sorted((op, n) for op, n in counts.items() if OP_PATTERN.search(op))
    return ", ".join(f"{op}×{n}" for op, n in shown) or "—"


# --- latency -----------------------------------------------------------------------------------


def take_rows(feed: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The first ``rows`` samples (repeated cyclically if the set is smaller)."""
    return {name: np.take(array, np.arange(rows) % len(array), axis=0) for name, array in feed.items()}


def time_against_original(original: Path, variant: Path, feed: dict[str, np.ndarray],
                          timing: Timing) -> list[tuple[np.ndarray, np.ndarray]]:
    """Seconds per call of (original, variant), interleaved, in 3 rounds of fresh sessions (two live at a time)."""
    rounds = timed_rounds(original, variant, feed, provider=PROVIDER, threads=timing.threads,
                          min_seconds=timing.seconds, min_runs=timing.pairs)
    gc.collect()
    return rounds


def measure_latency(results: list[Measured], feeds: dict[int, dict[str, np.ndarray]], timing: Timing,
                    name: str) -> dict[int, np.ndarray]:
    """Each variant against the original at each batch size; returns the original's pooled times."""
    original = results[0].path
    pooled: dict[int, list[np.ndarray]] = {batch: [] for batch in feeds}
    for result in results[1:]:
        for batch, feed in feeds.items():
            log(f"[{name}] timing {result.variant.label} vs original, batch {batch}")
            rounds = time_against_original(original, result.path, feed, timing)
            result.latency[batch] = compare_latency(PROVIDER, batch, rounds)
            pooled[batch] += [times_a for times_a, _ in rounds]
    return {batch: np.concatenate(parts) for batch, parts in pooled.items() if parts}


def ms(value: float) -> str:
    return f"{value:.4f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def latency_cells(result: Measured, pooled: dict[int, np.ndarray], batches: Sequence[int]) -> list[str]:
    """Per batch size: 'variant ms / original ms in the same pairs', and the ratio with [p10, p90]."""
    cells = []
    for batch in batches:
        if result.variant == ORIGINAL:
            stats = latency_stats(pooled[batch], batch) if batch in pooled else None
            cells += [ms(stats.median_ms) if stats else "—", "1"]
        else:
            comparison = result.latency[batch]
            cells += [f"{ms(comparison.compressed.median_ms)} / {ms(comparison.original.median_ms)}",
                      f"{comparison.ratio:.2f} [{comparison.ratio_p10:.2f}, {comparison.ratio_p90:.2f}]"]
    return cells


# --- the models ------------------------------------------------------------------------------


def measure_common(name: str, source: Path, variants: list[Variant], workdir: Path, threads: int) -> list[Measured]:
    log(f"[{name}] writing {len(variants) - 1} variants of {source.name}")
    built = build_variants(source, variants, workdir)
    results = []
    for variant in variants:
        path, weights = built[variant]
        result = Measured(variant, path, weights, model_file_bytes(path))
        result.ops_file, result.ops_runtime = op_counts(path, threads, workdir)
        results.append(result)
    return results


def run_mlp(name: str, batches: Sequence[int], timing: Timing, workdir: Path) -> tuple[list[Measured], dict]:
    threads = timing.threads
    source, data = MODELS / f"{name}_mlp.onnx", MODELS / f"{name}_test.npz"
    results = measure_common(name, source, mlp_variants(), workdir, threads)
    reference = make_session(source, PROVIDER, threads)
    feed, labels = load_data(data, reference)
    del reference
    pooled = measure_latency(results, {b: take_rows(feed, b) for b in batches}, timing, name)
    log(f"[{name}] accuracy on {data.name} ({len(labels):,} samples)")
    accuracy: dict[Variant, float] = {}
    for result in results:
        session_a = make_session(source, PROVIDER, threads)
        session_b = make_session(result.path, PROVIDER, threads)
        report = compare_models(session_a, session_b, list(split_batches(feed, session_a, 256)), labels=labels)
        del session_a, session_b
        scores = report.compressed
        accuracy[result.variant] = scores.accuracy
        change = 100.0 * (scores.accuracy - report.original.accuracy)
        result.scores = [f"{scores.accuracy:.2%}", f"{scores.macro_f1:.4f}",
                         "—" if result.variant == ORIGINAL else f"{change:+.2f}",
                         f"{report.outputs[0].mean_cosine:.5f}"]
    safe, unsafe = accuracy[Variant(COMBINED_TAU, SAFE)], accuracy[Variant(COMBINED_TAU, UNSAFE)]
    extra = {"pooled": pooled, "samples": len(labels), "data": data.name,
             "pitfall": f"{name}: SVD τ={COMBINED_TAU:g} + INT8 without reduce_range vs with it: "
                        f"{100.0 * (unsafe - safe):+.2f} accuracy points ({unsafe:.2%} vs {safe:.2%})"}
    return results, extra


def run_minilm(batches: Sequence[int], timing: Timing, workdir: Path) -> tuple[list[Measured], dict]:
    from benchmarks.text_eval import BUILD, cosine_rows, load_text_set, probe_accuracy, sentence_embeddings

    results = measure_common("minilm", MINILM, minilm_variants(), workdir, timing.threads)
    with np.load(BUILD / "newsgroups.npz") as archive:
        tokens = {k: archive[k][:, :MINILM_SEQ] for k in TEXT_INPUTS}
    pooled = measure_latency(results, {b: take_rows(tokens, b) for b in batches}, timing, "minilm")
    data = {name: load_text_set(name) for name in TEXT_SETS}
    log("[minilm] sentence embeddings and probes on " + ", ".join(TEXT_SETS))
    originals = {name: sentence_embeddings(MINILM, feed) for name, (feed, _) in data.items()}
    cosine_mean: dict[Variant, list[float]] = {}
    for result in results:
        cosines, probes = [], []
        cosine_mean[result.variant] = []
        for name, (feed, labels) in data.items():
            embeddings = originals[name] if result.variant == ORIGINAL else sentence_embeddings(result.path, feed)
            similarity = cosine_rows(originals[name], embeddings)
            cosine_mean[result.variant].append(float(similarity.mean()))
            cosines.append(f"{similarity.mean():.4f} / {similarity.min():.4f}")
            probes.append(f"{probe_accuracy(embeddings, labels):.3f}")
        result.scores = cosines + probes
    safe, unsafe = cosine_mean[Variant(COMBINED_TAU, SAFE)], cosine_mean[Variant(COMBINED_TAU, UNSAFE)]
    lengths = {name: feed["input_ids"].shape[1] for name, (feed, _) in data.items()}
    pitfall = "; ".join(f"{name} {u:.4f} vs {s:.4f}" for name, u, s in zip(TEXT_SETS, unsafe, safe, strict=True))
    extra = {"pooled": pooled, "lengths": lengths,
             "pitfall": f"minilm: SVD τ={COMBINED_TAU:g} + INT8 without reduce_range vs with it, "
                        f"mean cosine: {pitfall}"}
    return results, extra


# --- the report --------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]], left: int = 2) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * left + ["---:"] * (len(headers) - left)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def latency_headers(batches: Sequence[int]) -> list[str]:
    return [h for b in batches for h in (f"b{b} ms (vs orig)", f"b{b} ratio [p10, p90]")]


def model_section(title: str, results: list[Measured], extra: dict, batches: Sequence[int], quality: list[str],
                  intro: str) -> str:
    base = results[0].file_bytes
    rows = [[r.variant.label, f"`{r.weights}`", f"{r.file_bytes:,}", f"{r.file_bytes / base:.3f}",
             *latency_cells(r, extra["pooled"], batches), *r.scores] for r in results]
    headers = ["variant", "weights", "file bytes", "size ratio", *latency_headers(batches), *quality]
    ops = [[r.variant.label, show_ops(r.ops_file), show_ops(r.ops_runtime)] for r in results]
    return "\n\n".join([
        f"## {title}", intro, table(headers, rows),
        "Ops (MatMul-like, quantization and attention ops only) in the file and in the graph onnxruntime runs"
        " after its CPU graph optimizations. `quantize_dynamic` treats each factor of a factored layer as its own"
        " MatMul: both become MatMulInteger with their own DynamicQuantizeLinear, so the rank-k activation between"
        " them is quantized to uint8 once more, and onnxruntime fuses each into a DynamicQuantizeMatMul (the bias"
        " folded into the second); constant-table Gathers become DequantizeLinear; activation×activation MatMuls"
        " (attention) stay float:",
        table(["variant", "in the file", "after onnxruntime optimization"], ops, left=3),
    ])


def cpu_description() -> tuple[str, list[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
        model = found.group(1).strip() if found else model
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
        flags = set(found.group(1).split()) if found else set()
    except OSError:
        pass
    return model, [f for f in INT8_FLAGS if f in flags]


def saturation_probe(threads: int) -> tuple[int, int]:
    """(what onnxruntime returns, the exact value) for a MatMulInteger of uint8 255s by int8 127s, K = 64.

    Every adjacent pair of products sums to 64,770, past int16: kernels that add pairs in saturating int16
    (AVX2's VPMADDUBSW) come out low; kernels that accumulate in int32 (VNNI, AMX) are exact.
    """
    from onnx import TensorProto, helper, numpy_helper

    depth, width = 64, 16
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "saturation_probe",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", depth])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", width])],
        [numpy_helper.from_array(np.full((depth, width), 127, np.int8), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    session = make_session(model.SerializeToString(), PROVIDER, threads)
    (result,) = session.run(None, {"a": np.full((32, depth), 255, np.uint8)})
    return int(result.min()), 255 * 127 * depth


def pitfall_note(flags: list[str]) -> str:
    vnni = [f for f in flags if f in VNNI_FLAGS]
    if vnni:
        return (f"This CPU has {', '.join(vnni)}: onnxruntime's u8×s8 kernels then accumulate in int32 (VPDPBUSD/AMX), "
                "without the saturating int16 pair sums of AVX2's VPMADDUBSW, so `reduce_range` is not expected to "
                "matter here; on AVX2 (or AVX-512 without VNNI) CPUs signed 8-bit weights can saturate and "
                "`reduce_range=True` (7-bit weights) or unsigned weights avoid it.")
    return ("This CPU has no VNNI: onnxruntime's u8×s8 kernels use AVX2's VPMADDUBSW, whose int16 pair sums can "
            "saturate with full-range signed 8-bit weights; `reduce_range=True` (7-bit weights) avoids it.")


def header(argv: list[str] | None, args: argparse.Namespace, load_before: tuple[float, ...]) -> list[str]:
    cpu, flags = cpu_description()
    threads = (f"{args.threads}" if args.threads else
               "onnxruntime default (0: one per physical core)")
    title = "onnx-arsvd vs onnxruntime dynamic INT8 quantization, and both combined"
    machine = f"{cpu}; int8-relevant CPU flags: {', '.join(flags) or 'none found'}"
    return common_header(title, __file__, argv, packages=(*PACKAGES, "scikit-learn"), machine=machine, notes=[
        f"sessions: {PROVIDER}, intra-op threads {threads}, inter-op threads default (sequential executor),"
        " intra-op thread spinning off (`session.intra_op.allow_spinning=0`), graph optimization level default (ALL)",
        f"latency: each variant is timed interleaved against the original (A B, B A, ...;"
        f" at least {args.seconds:g} s and {args.pairs} pairs per variant and batch size),"
        " one pair of sessions live at a time;"
        f" {WARMUP} warm-up calls each; `bN ms (vs orig)` = median ms per call at batch N of the variant / of the"
        " original in the same pairs (the original row: the median of its runs pooled over all pairs); ratio ="
        " median of the per-pair variant/original ratios (below 1 = faster) with the p10-p90 of those ratios."
        " Compare ratios, not ms across rows: the load on the machine can change between pairs",
        "INT8 = `onnxruntime.quantization.quantize_dynamic(model, out, weight_type=QuantType.QInt8,"
        " per_channel=True, reduce_range=True)` unless marked unsafe (`reduce_range=False`); other arguments"
        " default (every op type it supports, so Gather on constant tables is quantized too)",
        "SVD = `onnx_arsvd.compress(model, out, policy=EnergyPolicy(tau))` with the default gates;"
        " weights = ranks per layer in graph order (`*` = kept dense) or the number of factored layers",
        f"machine load average (1, 5, 15 min) at start: {', '.join(f'{x:.2f}' for x in load_before)}",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=ALL_MODELS, default=None,
                        help="default: all available (MiniLM only when models/build/minilm.onnx exists)")
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum measuring time per variant and batch size")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 = onnxruntime default")
    parser.add_argument("--pairs", type=int, default=10, help="minimum interleaved pairs per variant and batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if any(b < 1 for b in args.batches):
        parser.error("batch sizes must be positive")
    if args.pairs < 1 or args.seconds < 0 or args.threads < 0:
        parser.error("--pairs must be positive, --seconds and --threads not negative")
    timing = Timing(args.threads, args.seconds, args.pairs)
    models = list(dict.fromkeys(args.models or ALL_MODELS))
    notes = []
    if "minilm" in models and not MINILM.exists():
        message = f"MiniLM skipped: {MINILM} is not built (run python models/build_minilm.py)"
        log(message)
        notes.append(message)
        models.remove("minilm")

    started_at = time.perf_counter()
    load_before = os.getloadavg()
    sections, pitfalls = [], []
    with tempfile.TemporaryDirectory(prefix="compare_quantization_") as tmp:
        workdir = Path(tmp)
        for name in models:
            if name == "minilm":
                results, extra = run_minilm(args.batches, timing, workdir)
                lengths = ", ".join(f"{n} {length}" for n, length in extra["lengths"].items())
                intro = (f"`models/build/minilm.onnx` (all-MiniLM-L6-v2). Latency feeds: the first N newsgroups rows"
                         f" at sequence length {MINILM_SEQ} (real tokens, padded to {MINILM_SEQ}). Quality: mean-pooled"
                         f" sentence embeddings on 200 polarity and 200 newsgroups sentences (trimmed to the longest"
                         f" real sequence: {lengths}); cosine with the original's embeddings (mean / min over"
                         f" sentences) and 5-fold logistic-regression probe accuracy (fold-to-fold spread 4-6 points"
                         f" on polarity).")
                quality = [*(f"{n} cos mean / min" for n in TEXT_SETS), *(f"{n} probe" for n in TEXT_SETS)]
            else:
                results, extra = run_mlp(name, args.batches, timing, workdir)
                intro = (f"`models/{name}_mlp.onnx`. Latency feeds: the first N rows of `{extra['data']}`."
                         f" Quality on all {extra['samples']:,} test samples: top-1 accuracy, macro-F1, accuracy"
                         f" change vs the original in points, and mean cosine of the logits with the original's.")
                quality = ["accuracy", "macro-F1", "Δacc (pts)", "logit cos"]
            sections.append(model_section(f"{results[0].path.name}", results, extra, args.batches, quality, intro))
            pitfalls.append(extra["pitfall"])
    elapsed = time.perf_counter() - started_at
    _, flags = cpu_description()
    parts = ["\n".join(header(argv, args, load_before)
                       + [f"- machine load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())};"
                          f" wall time of the run {elapsed:.0f} s"]
                       + [f"- {note}" for note in notes])]
    parts += sections
    got, exact = saturation_probe(args.threads)
    probe = (f"Saturation probe on this machine's onnxruntime: MatMulInteger of uint8 255s by int8 127s (K = 64) gives"
             f" {got:,}, exact {exact:,}: " + ("exact, so the u8×s8 kernels here do not saturate." if got == exact else
                                               "low, so the u8×s8 kernels here saturate: use `reduce_range=True`."))
    parts.append("\n".join(["## The `reduce_range` check", "", pitfall_note(flags), "", probe, "",
                            *(f"- {line}" for line in pitfalls)]))
    text = "\n\n".join(parts) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
