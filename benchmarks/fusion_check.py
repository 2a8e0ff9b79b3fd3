"""Do onnxruntime's graph optimisations still apply after the ARSVD rewrite, and what does a lost fusion cost?

Each factored layer becomes MatMul(X, A) -> MatMul(., B) [-> Add(bias)]. This script checks, on the
shipped MLP (``models/fashion_mlp.onnx``, 3 Gemm) and on all-MiniLM-L6-v2
(``models/build/minilm.onnx``, 36 MatMul weights), original and energy tau 0.9 / 0.8:

1. session-level optimisation: op counts of the graph onnxruntime saves at ORT_ENABLE_BASIC,
   ORT_ENABLE_EXTENDED and ORT_ENABLE_ALL (``optimized_model_filepath``);
2. MiniLM only: the offline transformer optimiser
   (``onnxruntime.transformers.optimizer.optimize_model``, model_type bert, 12 heads, hidden 384),
   its fused-operator statistics, and which encoder layers get an Attention node. The shipped
   export never gets Attention, even uncompressed (see the notes in the output), so a second,
   "fusable" export is made here: the same model with the attention scale ``Mul(QK, 1/sqrt(32))``
   written as ``Div(QK, sqrt(32))``, the pattern the fuser knows. Two routes that could keep the
   fusion are measured too: compressing with the attention projections kept dense, and optimising first (with
   MultiHeadAttention, which leaves the Q/K/V MatMul nodes in place) and compressing the optimised
   graph;
3. latency, original vs compressed, at default session optimisation and after the transformer
   optimiser, batch 1 and 32 (MiniLM seq 128), timed pairwise interleaved with spinning off
   (never more than two live sessions); and max |difference| of every optimised compressed model
   from the same compressed model run with all graph optimisation disabled.

Usage: python -m benchmarks.fusion_check [--seconds 2] [--threads 0] [--out benchmarks/results/fusion.md]
"""

from __future__ import annotations

import argparse
import contextlib
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
from dataclasses import dataclass, field
from pathlib import Path

# The SVDs inside compress() use OpenBLAS; with its default thread count on a busy 2-core machine
# they run ~25x slower (threads wait on each other). One BLAS thread does not touch onnxruntime,
# whose kernels use their own thread pool.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from benchmarks.results_io import header as common_header
from benchmarks.results_io import write_result
from onnx_arsvd import EnergyPolicy, compress
from onnx_arsvd.io.models import load_model
from onnx_arsvd.measure.benchmark import batch_feed, compare_latency, timed_rounds
from onnx_arsvd.measure.results import LatencyComparison
from onnx_arsvd.measure.verification import make_session

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "models" / "fashion_mlp.onnx"
MINILM = ROOT / "models" / "build" / "minilm.onnx"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "fusion.md"
PROVIDER = "CPUExecutionProvider"
TAUS = (0.9, 0.8)
SEQ = 128
NUM_HEADS, HIDDEN = 12, 384
LEVELS = ("ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")
TIMED_OPT_LEVEL = 1  # optimize_model's default for bert; the timed models use it
# Op types worth a column (shown when some row has one), in this order.
OPS = ["Gemm", "FusedGemm", "MatMul", "FusedMatMul", "MatMulNBits", "Add", "BiasGelu", "FastGelu", "Gelu",
       "LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization", "Attention",
       "MultiHeadAttention"]
# What the Attention fuser needs dense: the Q/K/V projections and the attention output projection.
ATTENTION_PROJ = {"q": "/attention/self/query/", "k": "/attention/self/key/", "v": "/attention/self/value/",
                  "o": "/attention/output/dense/"}
ATTENTION_GLOB = "*/attention/*"
LAYER_RE = re.compile(r"layer\.(\d+)/")


def log(message: str) -> None:
    print(f"[fusion_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Graph inspection
# ---------------------------------------------------------------------------------------------

def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def session_optimised(path: Path, level: str, out: Path) -> tuple[Counter, str]:
    """Op counts of the graph onnxruntime saves at ``level``; falls back to EXTENDED if ALL cannot be saved."""
    for attempt in (level, "ORT_ENABLE_EXTENDED") if level == "ORT_ENABLE_ALL" else (level,):
        options = ort.SessionOptions()
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, attempt)
        options.optimized_model_filepath = os.fspath(out)
        options.log_severity_level = 3  # ALL warns that the saved graph may be hardware-specific
        try:
            ort.InferenceSession(os.fspath(path), options, providers=[PROVIDER])
            return op_counts(onnx.load(os.fspath(out))), attempt
        except Exception as error:  # onnxruntime raises its own types
            log(f"saving {path.name} at {attempt} failed: {str(error).splitlines()[0]}")
    raise RuntimeError(f"onnxruntime could not save an optimised {path.name}")


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """The transformer optimiser logs every failed pattern match at DEBUG and misses at WARNING."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


@dataclass
class BertResult:
    """One run of the transformer optimiser."""

    stats: dict[str, int]
    counts: Counter
    attention_layers: set[int]
    seconds: float


def bert_optimise(path: Path, opt_level: int, out: Path | None = None, mha: bool = False) -> BertResult:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.use_multi_head_attention = mha
    started = time.perf_counter()
    with quiet_logging():
        optimised = optimize_model(os.fspath(path), model_type="bert", num_heads=NUM_HEADS, hidden_size=HIDDEN,
                                   opt_level=opt_level, optimization_options=options)
        stats = {op: n for op, n in optimised.get_fused_operator_statistics().items() if n}
    if out is not None:
        optimised.save_model_to_file(os.fspath(out))
    model = optimised.model
    return BertResult(stats, op_counts(model), attention_layers(model), time.perf_counter() - started)


def attention_layers(model: onnx.ModelProto) -> set[int]:
    """Encoder layers whose self-attention became one Attention / MultiHeadAttention node."""
    layers = set()
    for node in model.graph.node:
        if node.op_type in ("Attention", "MultiHeadAttention"):
            match = LAYER_RE.search(" ".join(node.output))
            if match:
                layers.add(int(match.group(1)))
    return layers


def fusable_export(source: Path, target: Path) -> int:
    """Write ``source`` with each attention-scale ``Mul(QK, c)`` as ``Div(QK, 1/c)``; returns how many.

    transformers 5 eager attention scales the scores with Mul after Q @ K^T, so the Add before the
    Softmax has two Mul parents (scale and mask bias). The fuser takes the first Mul parent for
    both the score path and the mask path, so one of the two never matches. With Div the match
    is unambiguous. 1/c = sqrt(32) is not exact in float32, so outputs move by float rounding.
    """
    model = onnx.load(os.fspath(source))
    constants = {node.output[0]: node.attribute[0].t for node in model.graph.node
                 if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"}
    initializers = {init.name: init for init in model.graph.initializer}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Mul" or not node.name.endswith("attention/self/Mul"):
            continue
        name = node.input[1]
        tensor = constants.get(name) or initializers.get(name)
        if tensor is None:
            continue
        value = numpy_helper.to_array(tensor)
        if value.size != 1:
            continue
        recip = f"{node.name}/arsvd_fusion_check_reciprocal"
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(1.0 / value, dtype=value.dtype), recip))
        node.op_type, node.input[1] = "Div", recip
        changed += 1
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    keep = [node for node in model.graph.node if node.op_type != "Constant" or node.output[0] in used]
    del model.graph.node[:]
    model.graph.node.extend(keep)
    keep_init = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep_init)
    onnx.save(model, os.fspath(target))
    return changed


def attention_factored(report) -> dict[int, str]:
    """Per encoder layer: which of the q/k/v/o(utput) attention projections are factored ('' = none)."""
    flags: dict[int, str] = {}
    for layer in report.layers:
        match = LAYER_RE.search(layer.name)
        if match:
            letters = flags.setdefault(int(match.group(1)), "")
            proj = next((k for k, part in ATTENTION_PROJ.items() if part in layer.name), None)
            if proj and layer.factored:
                flags[int(match.group(1))] = letters + proj
    return dict(sorted(flags.items()))


def is_attention_proj(name: str) -> bool:
    return any(part in name for part in ATTENTION_PROJ.values())


def ranks(report) -> list[int | None]:
    return [layer.rank if layer.factored else None for layer in report.layers]


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------

def unoptimised_session(path: Path, threads: int) -> ort.InferenceSession:
    """A session with every graph optimisation off (make_session cannot set the level)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), options, providers=[PROVIDER])


@dataclass
class Timed:
    group: str
    label_a: str
    label_b: str
    comparison: LatencyComparison


@dataclass
class Diff:
    model: str
    against: str
    max_abs: float  # right-padded attention mask (or the generated feed when the model has no mask)
    ref_max: float
    max_abs_holes: float | None = None  # a random 0/1 attention mask (zeros inside rows)
    fused_attention: bool = False  # the model has an Attention / MultiHeadAttention node


def with_mask(feed: dict[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    """The feed with its attention_mask all ones ('ones'), right-padded: row i keeps L - i*L/(2B) tokens
    ('padded'), or random 0/1 with zeros inside rows ('holes')."""
    if "attention_mask" not in feed:
        return feed
    mask = np.ones_like(feed["attention_mask"])
    if kind == "holes":
        mask = np.random.default_rng(1).integers(0, 2, mask.shape).astype(mask.dtype)
        mask[:, 0] = 1
    elif kind == "padded":
        rows, length = mask.shape
        for i in range(rows):
            mask[i, length - (i * length) // (2 * rows):] = 0
    return {**feed, "attention_mask": mask}


@dataclass
class Section:
    """Everything measured for one model."""

    name: str
    lines: list[str] = field(default_factory=list)
    timed: list[Timed] = field(default_factory=list)
    diffs: list[Diff] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    session_lost: tuple[int, list[str]] = (0, [])


def time_pair(paths: dict[str, Path], a: str, b: str, batch: int, dims: dict[str, int], args, ir_model,
              heavy: bool) -> LatencyComparison:
    feed = with_mask(batch_feed(make_session(paths[a], PROVIDER, args.threads), ir_model, batch, dims), "ones")
    # a MiniLM batch of 32 x 128 tokens takes seconds on 2 cores: fewer pairs, the time budget rules
    rounds = timed_rounds(paths[a], paths[b], feed, provider=PROVIDER, threads=args.threads,
                          min_seconds=args.seconds, min_runs=2 if heavy else 10)
    gc.collect()
    return compare_latency(PROVIDER, batch, rounds)


def max_diffs(paths: dict[str, Path], reference: str, tests: Sequence[str], dims: dict[str, int], batch: int,
              threads: int, ir_model, against: str | None = None) -> list[Diff]:
    """max |test - reference| where reference runs with graph optimisation off, each test at the default level."""
    def largest(actual, expected) -> float:
        return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
                   for x, y in zip(actual, expected, strict=True))

    ref_session = unoptimised_session(paths[reference], threads)
    generated = batch_feed(ref_session, ir_model, batch, dims, seed=1)
    padded, holes = with_mask(generated, "padded"), with_mask(generated, "holes")
    has_mask = "attention_mask" in holes
    expected = ref_session.run(None, padded)
    expected_holes = ref_session.run(None, holes) if has_mask else None
    out = []
    for test in tests:
        session = make_session(paths[test], PROVIDER, threads)
        diff = largest(session.run(None, padded), expected)
        diff_holes = largest(session.run(None, holes), expected_holes) if has_mask else None
        del session
        ref_max = max(float(np.max(np.abs(y))) for y in expected)
        fused = any(n.op_type in ("Attention", "MultiHeadAttention")
                    for n in onnx.load(os.fspath(paths[test])).graph.node)
        out.append(Diff(test, against or f"{reference} (ORT_DISABLE_ALL)", diff, ref_max, diff_holes, fused))
    del ref_session
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

def table(headers: Sequence[str], rows: Sequence[Sequence[object]], align: str = "l") -> list[str]:
    spec = ["---"] + [("---:" if align == "r" else "---")] * (len(headers) - 1)
    return ["| " + " | ".join(headers) + " |", "|" + "|".join(spec) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def count_table(rows: list[tuple[str, str, Counter]]) -> list[str]:
    ops = [op for op in OPS if any(counts.get(op) for _, _, counts in rows)]
    for must in ("MatMul", "Add"):
        if must not in ops:
            ops.append(must)
    ops = [op for op in OPS if op in ops]
    never = [op for op in OPS if op not in ops]
    body = [[variant, level, *(counts.get(op, 0) for op in ops), sum(counts.values())]
            for variant, level, counts in rows]
    lines = table(["variant", "level", *ops, "all nodes"], body, align="r")
    if never:
        lines.append(f"\nNever present in these graphs: {', '.join(never)}.")
    return lines


def timing_table(timed: list[Timed]) -> list[str]:
    rows = []
    for t in timed:
        c = t.comparison
        rows.append([t.group, c.batch, t.label_a, t.label_b, f"{c.original.median_ms:.3g}",
                     f"{c.compressed.median_ms:.3g}",
                     f"**{c.ratio:.3f}** ({c.ratio_p10:.2f}-{c.ratio_p90:.2f})", c.original.runs])
    return table(["comparison", "batch", "A", "B", "A median ms", "B median ms", "B/A (p10-p90 of pair ratios)",
                  "pairs"],
                 rows, align="r")


def diff_table(diffs: list[Diff]) -> list[str]:
    if all(d.max_abs_holes is None for d in diffs):
        return table(["model (default session optimisation)", "reference", "max abs diff", "reference max abs"],
                     [[d.model, d.against, f"{d.max_abs:.3g}", f"{d.ref_max:.3g}"] for d in diffs], align="r")
    return table(["model (default session optimisation)", "reference", "max abs diff, right-padded mask",
                  "max abs diff, random 0/1 mask", "reference max abs"],
                 [[d.model, d.against, f"{d.max_abs:.3g}", "-" if d.max_abs_holes is None else f"{d.max_abs_holes:.3g}",
                   f"{d.ref_max:.3g}"] for d in diffs], align="r")


def ratio(section: Section, a: str, b: str, batch: int) -> float | None:
    for t in section.timed:
        if t.label_a == a and t.label_b == b and t.comparison.batch == batch:
            return t.comparison.ratio
    return None


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# ---------------------------------------------------------------------------------------------
# The two models
# ---------------------------------------------------------------------------------------------

def compress_variants(source: Path, folder: Path, stem: str,
                      exclude: Sequence[str] = ()) -> tuple[dict[str, Path], dict]:
    paths, reports = {}, {}
    for tau in TAUS:
        label = f"tau {tau}"
        paths[label] = folder / f"{stem}_{tau}.onnx"
        _, reports[label] = compress(source, paths[label], policy=EnergyPolicy(tau), exclude=exclude, check=False,
                                      factor_heads=True)
    return paths, reports


FUSED = ("FusedGemm", "FusedMatMul", "BiasGelu", "FastGelu", "Gelu", "LayerNormalization", "SkipLayerNormalization",
         "EmbedLayerNormalization", "Attention", "MultiHeadAttention")


def lost_fusions(counts: dict[tuple[str, str], Counter]) -> tuple[int, list[str]]:
    """Session-level (variant, level, op) where a compressed variant has fewer fused nodes than the original."""
    checked, lost = 0, []
    for (variant, level), got in counts.items():
        if variant == "original":
            continue
        for op in FUSED:
            checked += 1
            before = counts[("original", level)].get(op, 0)
            if got.get(op, 0) < before:
                lost.append(f"{variant} {level} {op} {before}->{got.get(op, 0)}")
    return checked, lost


def session_section(title: str, variants: dict[str, Path],
                    folder: Path) -> tuple[list[str], dict[tuple[str, str], Counter], list[str]]:
    rows, counts, notes = [], {}, []
    for variant, path in variants.items():
        for level in LEVELS:
            got, used = session_optimised(path, level, folder / f"session_{path.stem}_{level}.onnx")
            shown = (level.removeprefix("ORT_ENABLE_") if used == level
                     else f"{level.removeprefix('ORT_ENABLE_')} (saved at {used})")
            if used != level:
                notes.append(f"{variant}: {level} could not be saved; counted {used} instead")
            rows.append((variant, shown, got))
            counts[(variant, level)] = got
    lines = [f"### {title}: session-level optimisation (saved optimised graph)", "", *count_table(rows),
             *(f"- {n}" for n in notes)]
    return lines, counts, notes


def mlp_section(args, folder: Path) -> Section:
    section = Section("fashion MLP")
    log("MLP: compressing")
    paths, reports = compress_variants(MLP, folder, "mlp")
    variants = {"original": MLP, **paths}
    lines, counts, _ = session_section("fashion MLP", variants, folder)
    section.session_lost = lost_fusions(counts)
    section.lines += ["MLP ranks (None = dense): " + "; ".join(f"{k}: {ranks(r)}" for k, r in reports.items()), "",
                      *lines, ""]
    fused = {v: counts[(v, "ORT_ENABLE_ALL")].get("FusedGemm", 0) for v in variants}
    gemm_basic = {v: counts[(v, "ORT_ENABLE_BASIC")].get("Gemm", 0) for v in variants}
    fmm = {v: counts[(v, "ORT_ENABLE_ALL")].get("FusedMatMul", 0) for v in variants}
    section.facts.append(
        "MLP, session level: FusedGemm (Gemm+Relu) count at ALL is "
        + ", ".join(f"{v} {n}" for v, n in fused.items())
        + "; Gemm count at BASIC " + ", ".join(f"{v} {n}" for v, n in gemm_basic.items())
        + " (onnxruntime turns the factored MatMul(., B) + Add(bias) back into a Gemm for 2-D input at BASIC)"
        + "; FusedMatMul at ALL " + ", ".join(f"{v} {n}" for v, n in fmm.items())
        + " (the first factor's MatMul absorbs the input Div by 255, which the original Gemm could not)."
    )
    log("MLP: timing")
    ir_model = load_model(MLP)
    for batch in (1, 32):
        for tau in TAUS:
            c = time_pair(variants, "original", f"tau {tau}", batch, {}, args, ir_model, heavy=False)
            section.timed.append(Timed("plain (default session optimisation)", "original", f"tau {tau}", c))
    section.diffs += max_diffs(variants, "original", ["original"], {}, 4, args.threads, ir_model)
    for tau in TAUS:
        section.diffs += max_diffs(variants, f"tau {tau}", [f"tau {tau}"], {}, 4, args.threads, ir_model)
    return section


def minilm_section(args, folder: Path) -> Section:
    section = Section("MiniLM")
    dims = {"seq": SEQ}
    ir_model = load_model(MINILM)

    log("MiniLM: compressing the shipped export")
    shipped, shipped_reports = compress_variants(MINILM, folder, "minilm")
    variants = {"original": MINILM, **shipped}
    log("MiniLM: session-level optimisation")
    lines, counts, _ = session_section("MiniLM (shipped export)", variants, folder)
    section.session_lost = lost_fusions(counts)
    section.lines += [*lines, ""]
    for tau in TAUS:
        r = shipped_reports[f"tau {tau}"]
        ops_tau, ops_orig = counts[(f"tau {tau}", "ORT_ENABLE_ALL")], counts[("original", "ORT_ENABLE_ALL")]
        section.facts.append(
            f"MiniLM tau {tau} factors {r.factored}/{len(r.layers)} layers; at every session level its MatMul count "
            f"is the original's + {ops_tau['MatMul'] - ops_orig['MatMul']}"
            f" and its FusedMatMul / BiasGelu / LayerNormalization counts at ALL are "
            f"{ops_tau.get('FusedMatMul', 0)} / {ops_tau.get('BiasGelu', 0)}"
            f" / {ops_tau.get('LayerNormalization', 0)} (original: "
            f"{ops_orig.get('FusedMatMul', 0)} / {ops_orig.get('BiasGelu', 0)}"
            f" / {ops_orig.get('LayerNormalization', 0)}).")

    # ---- the fusable export and its variants
    log("MiniLM: fusable export and its variants")
    fusable = folder / "minilm_fusable.onnx"
    changed = fusable_export(MINILM, fusable)
    fusable_all, _ = session_optimised(fusable, "ORT_ENABLE_ALL", folder / "session_fusable_ALL.onnx")
    section.facts.append(
        "The fusable export (scale as Div) gives the same op counts as the shipped export at session level "
        f"ORT_ENABLE_ALL: {'yes' if fusable_all == counts[('original', 'ORT_ENABLE_ALL')] else 'NO'} "
        "(FusedMatMul absorbs either form of the scale), so plain ratios carry over between the two exports.")
    # Mul -> Div touches no weight, so the fusable compressed models are the shipped compressed
    # models with the same edit (no second SVD); one is compressed from the fusable export to check.
    f_paths = {k: folder / f"minilm_fusable_{k.split()[-1]}.onnx" for k in shipped}
    for k, p in f_paths.items():
        fusable_export(shipped[k], p)
    f_reports = shipped_reports
    excl_path = folder / "minilm_fusable_qkv_dense_0.8.onnx"
    _, excl_report = compress(fusable, excl_path, policy=EnergyPolicy(0.8), exclude=[ATTENTION_GLOB], check=False,
                              factor_heads=True)
    excl_ranks = [r for d, r in zip(excl_report.layers, ranks(excl_report), strict=True)
                  if not is_attention_proj(d.name)]
    ref_report = shipped_reports["tau 0.8"]
    ref_ranks = [r for d, r in zip(ref_report.layers, ranks(ref_report), strict=True)
                 if not is_attention_proj(d.name)]
    same_ranks = excl_ranks == ref_ranks

    # ---- transformer optimiser statistics
    log("MiniLM: transformer optimiser")
    bert_rows = []
    paths: dict[str, Path] = {"original": MINILM, **shipped,
                              "fusable original": fusable, **{f"fusable {k}": p for k, p in f_paths.items()},
                              "fusable tau 0.8, attention dense": excl_path}
    bert: dict[tuple[str, int], BertResult] = {}
    for label in list(paths):
        for level in sorted(set(args.opt_levels) | {TIMED_OPT_LEVEL}):
            target = None
            if level == TIMED_OPT_LEVEL:
                target = folder / f"bert_{Path(paths[label]).stem}.onnx"
            result = bert_optimise(paths[label], level, target)
            bert[(label, level)] = result
            if target is not None:
                paths[f"{label} +opt"] = target
            bert_rows.append((label, level, result))
    # optimise first with MultiHeadAttention (Q/K/V MatMul nodes stay), then compress the optimised graph
    mha_original = folder / "bert_mha_fusable.onnx"
    mha_result = bert_optimise(fusable, TIMED_OPT_LEVEL, mha_original, mha=True)
    paths["MHA-opt original"] = mha_original
    bert_rows.append(("MHA-opt original", TIMED_OPT_LEVEL, mha_result))
    mha_reports = {}
    for tau in TAUS:
        label = f"MHA-opt then tau {tau}"
        paths[label] = folder / f"bert_mha_fusable_then_{tau}.onnx"
        _, mha_reports[tau] = compress(mha_original, paths[label], policy=EnergyPolicy(tau), check=False,
                                      factor_heads=True)
        model = onnx.load(os.fspath(paths[label]))
        stats = {op: n for op, n in op_counts(model).items()
                 if op in ("EmbedLayerNormalization", "MultiHeadAttention", "BiasGelu", "SkipLayerNormalization",
                           "LayerNormalization")}
        bert_rows.append((label, "(compressed after)",
                          BertResult(stats, op_counts(model), attention_layers(model), 0.0)))
    stat_ops = sorted({op for _, _, r in bert_rows for op in r.stats},
                      key=lambda op: (OPS.index(op) if op in OPS else len(OPS), op))
    body = [[label, level, *(r.stats.get(op, 0) for op in stat_ops), r.counts.get("MatMul", 0),
             ", ".join(map(str, sorted(r.attention_layers))) or "-"] for label, level, r in bert_rows]
    section.lines += [
        "### MiniLM: transformer optimiser (`optimize_model(..., model_type='bert', num_heads=12, hidden_size=384)`)",
        "",
        f"`get_fused_operator_statistics()` (non-zero entries), plain MatMul count, and the encoder layers whose "
        f"self-attention became one Attention/MultiHeadAttention node. 'fusable' = the shipped export with the "
        f"{changed} attention-scale Mul "
        f"nodes written as Div (see notes), and its tau variants are the shipped tau variants with the same edit; "
        f"compressing the fusable export directly ('attention dense' row) gives the shipped export's ranks on the "
        f"other layers: "
        f"{'yes' if same_ranks else 'NO'}. 'MHA-opt' = optimised with `use_multi_head_attention=True` at opt_level "
        f"{TIMED_OPT_LEVEL}; 'then tau' rows compress that optimised graph (counts read from the compressed file).",
        "",
        *table(["variant", "opt_level", *stat_ops, "MatMul", "Attention in layers"], body, align="r"),
        "",
    ]
    # per-layer table
    per_layer = []
    flags = {k: attention_factored(r) for k, r in f_reports.items()}
    flags["tau 0.8, attention dense"] = attention_factored(excl_report)
    lost_rule_ok = True
    for i in sorted(flags["tau 0.9"]):
        row = [i]
        for key, label in (("tau 0.9", "fusable tau 0.9"), ("tau 0.8", "fusable tau 0.8"),
                           ("tau 0.8, attention dense", "fusable tau 0.8, attention dense")):
            letters = flags[key][i]
            fused = i in bert[(label, TIMED_OPT_LEVEL)].attention_layers
            lost_rule_ok &= fused == (not letters)
            row += [letters or "-", "yes" if fused else "**no**"]
        row += ["yes" if i in r.attention_layers else "**no**"
                for _, lvl, r in bert_rows if lvl == "(compressed after)"]
        per_layer.append(row)
    section.lines += [
        f"### MiniLM: Attention per encoder layer (fusable export, opt_level {TIMED_OPT_LEVEL})",
        "",
        "Factored = which of the attention projections the rewrite factored: q/k/v = query/key/value, "
        "o = attention output dense. 'attention dense' = tau 0.8 with `exclude=['" + ATTENTION_GLOB + "']`.",
        "",
        *table(["layer", "tau 0.9 factored", "tau 0.9 Attention", "tau 0.8 factored", "tau 0.8 Attention",
                "attention dense: factored", "Attention", *(f"MHA-opt then tau {t}: MHA" for t in TAUS)],
               per_layer),
        "",
    ]
    orig_att = len(bert[("fusable original", TIMED_OPT_LEVEL)].attention_layers)
    shipped_att = len(bert[("original", TIMED_OPT_LEVEL)].attention_layers)
    for tau in TAUS:
        kept = len(bert[(f"fusable tau {tau}", TIMED_OPT_LEVEL)].attention_layers)
        with_proj = sum(bool(v) for v in flags[f"tau {tau}"].values())
        section.facts.append(
            f"Transformer optimiser, fusable export, tau {tau}: Attention fusion is lost in {orig_att - kept} of "
            f"{orig_att} layers; {with_proj} layers have at least one of Q/K/V/attention-output factored. "
            f"EmbedLayerNormalization: original "
            f"{bert[('fusable original', TIMED_OPT_LEVEL)].stats.get('EmbedLayerNormalization', 0)}, compressed "
            f"{bert[(f'fusable tau {tau}', TIMED_OPT_LEVEL)].stats.get('EmbedLayerNormalization', 0)}.")
    section.facts.append(
        "Rule 'a layer keeps Attention exactly when none of its Q, K, V and attention-output projections is factored' "
        f"holds in every layer of the three variants: {'yes' if lost_rule_ok else 'NO'}. (The fuser walks up "
        "from the normalisation node through the bias Add and the output projection's single MatMul to the Reshape "
        "of the attention result, and "
        "requires the Q/K/V MatMul nodes to read the LayerNorm output directly; a factored projection is two MatMuls, "
        "the second reading the rank-k intermediate.)")
    section.facts.append(
        f"Shipped export: Attention fused in {shipped_att} of 6 layers even uncompressed; "
        "SkipLayerNormalization / BiasGelu "
        f"after the optimiser: original {bert[('original', TIMED_OPT_LEVEL)].stats.get('SkipLayerNormalization', 0)} / "
        f"{bert[('original', TIMED_OPT_LEVEL)].stats.get('BiasGelu', 0)}, "
        + ", ".join(f"tau {t} {bert[(f'tau {t}', TIMED_OPT_LEVEL)].stats.get('SkipLayerNormalization', 0)} / "
                    f"{bert[(f'tau {t}', TIMED_OPT_LEVEL)].stats.get('BiasGelu', 0)}" for t in TAUS) + ".")
    excl = bert[("fusable tau 0.8, attention dense", TIMED_OPT_LEVEL)]
    section.facts.append(
        f"Keeping the attention projections dense (`exclude=['{ATTENTION_GLOB}']`, tau 0.8: {excl_report.factored}/"
        f"{len(excl_report.layers)} layers factored, dense params kept "
        f"{excl_report.dense_params_after / excl_report.dense_params_before:.1%} vs "
        f"{f_reports['tau 0.8'].dense_params_after / f_reports['tau 0.8'].dense_params_before:.1%} without the "
        f"exclusion) keeps Attention in {len(excl.attention_layers)} of 6 layers.")
    section.facts.append(
        "Optimising first with MultiHeadAttention and compressing the optimised graph: "
        + ", ".join(f"tau {t} factors {mha_reports[t].factored}/{len(mha_reports[t].layers)} layers and keeps "
                    f"MultiHeadAttention in "
                    f"{len(next(r for k, _, r in bert_rows if k == f'MHA-opt then tau {t}').attention_layers)} of 6"
                    for t in TAUS) + ".")

    # ---- latency
    log("MiniLM: timing")
    plan = [  # (group, A, B, batches)
        ("plain (default session optimisation)", "original", "tau 0.9", (1,)),
        ("plain (default session optimisation)", "original", "tau 0.8", (1, 32)),
        ("optimiser, shipped export (no Attention in either)", "original +opt", "tau 0.9 +opt", (1,)),
        ("optimiser, shipped export (no Attention in either)", "original +opt", "tau 0.8 +opt", (1, 32)),
        ("optimiser, fusable export (Attention lost where an attention projection is factored)",
         "fusable original +opt", "fusable tau 0.9 +opt", (1,)),
        ("optimiser, fusable export (Attention lost where an attention projection is factored)",
         "fusable original +opt", "fusable tau 0.8 +opt", (1, 32)),
        ("optimise (MHA) first, then compress", "MHA-opt original", "MHA-opt then tau 0.9", (1,)),
        ("optimise (MHA) first, then compress", "MHA-opt original", "MHA-opt then tau 0.8", (1, 32)),
        ("what the optimiser buys", "original", "original +opt", (1,)),
        ("what the optimiser buys", "fusable original", "fusable original +opt", (1, 32)),
        ("what the optimiser buys", "fusable tau 0.8", "fusable tau 0.8 +opt", (1,)),
        ("what the optimiser buys", "fusable original +opt", "MHA-opt original", (1,)),
        ("best pipeline for the compressed model", "tau 0.8", "MHA-opt then tau 0.8", (1, 32)),
        ("best pipeline for the compressed model", "fusable original +opt", "MHA-opt then tau 0.8", (1, 32)),
    ]
    for batch in (1, 32):
        for group, a, b, batches in plan:
            if batch not in batches:
                continue
            log(f"  batch {batch}: {a} vs {b}")
            c = time_pair(paths, a, b, batch, dims, args, ir_model, heavy=batch >= 32)
            section.timed.append(Timed(group, a, b, c))

    # ---- numerics: every optimised compressed model against the same compressed model, unoptimised
    log("MiniLM: numerical checks")
    section.diffs += max_diffs(paths, "original", ["original", "original +opt", "fusable original",
                                                   "fusable original +opt", "MHA-opt original"],
                               dims, 2, args.threads, ir_model)
    for tau in TAUS:
        section.diffs += max_diffs(paths, f"tau {tau}", [f"tau {tau}", f"tau {tau} +opt"], dims, 2, args.threads,
                                   ir_model)
        section.diffs += max_diffs(paths, f"fusable tau {tau}", [f"fusable tau {tau}", f"fusable tau {tau} +opt",
                                                                 f"MHA-opt then tau {tau}"],
                                   dims, 2, args.threads, ir_model)
    return section


def header(argv: list[str] | None, args, seconds_total: float) -> list[str]:
    threads = args.threads or f"onnxruntime default ({os.cpu_count()} CPUs)"
    return [*common_header("Do onnxruntime's fusions survive the ARSVD rewrite?", __file__, argv,
                           machine=platform.processor() or platform.machine(), notes=[
        f"wall time {seconds_total:.0f} s",
        f"provider {PROVIDER}; intra-op threads: {threads}; thread spinning off; timing: pairs run interleaved "
        f"(A B, B A, ...) for at least {args.seconds:g} s per row "
        "(MiniLM batch 32: at least 5 pairs after 1 warm-up pair); "
        f"ratio = median of per-pair B/A; MiniLM feeds are generated, batch x {SEQ} tokens, attention_mask all ones "
        "(no padding).",
        "timings come from one run; on a shared or busy machine they are noisy, and p10-p90 shows how much."]),
        "",
    ]


NOTES = [
    "## Notes",
    "",
    "- The shipped export gets no Attention fusion, even uncompressed: transformers 5 eager attention scales the "
    "scores with `Mul` after Q @ K^T, so the `Add` before the Softmax has two `Mul` parents "
    "(scale, and the mask bias). "
    "`fusion_attention.py` matches both the score path (`Softmax <- Add <- Mul <- MatMul`) and the mask path "
    "(`Add <- Mul <- Sub <- Cast <- Unsqueeze <- Unsqueeze`) with 'first `Mul` parent', so one of them fails "
    "whatever the input order ('failed to match mask path', or 'failed to match qk path' with the inputs swapped). "
    "The fusable export writes the scale as `Div(QK, sqrt(32))`, which the fuser's path1 matches; it is an "
    "experiment made by this script, not a change to the model file.",
    "- Session-level counts at ORT_ENABLE_ALL come from a graph onnxruntime saves with a warning that it may contain "
    "hardware-specific (NCHWc) changes; on this CPU and these models saving worked "
    "(a row says so if it fell back to EXTENDED).",
    "- Transformer-optimised models are saved at opt_level 1 (the default for bert) and then loaded with the default "
    "session optimisation (ORT_ENABLE_ALL) for timing and numerics.",
    "",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="minimum seconds of interleaved timing per row")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = onnxruntime default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--opt-levels", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                        help="optimize_model opt_levels for the statistics table (default 0,1,2; 1 is always run)")
    args = parser.parse_args(argv)
    for path in (MLP, MINILM):
        if not path.exists():
            print(f"{path} missing (MiniLM: run python models/build_minilm.py first)", file=sys.stderr)
            return 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fusion_check_") as tmp:
        folder = Path(tmp)
        mlp = mlp_section(args, folder)
        minilm = minilm_section(args, folder)
    elapsed = time.perf_counter() - started

    lines = header(argv, args, elapsed)
    lines += ["## Conclusion (measured in this run)", ""]
    checked = mlp.session_lost[0] + minilm.session_lost[0]
    lost = mlp.session_lost[1] + minilm.session_lost[1]
    lines.append(f"- Session-level optimisation (BASIC/EXTENDED/ALL): a compressed variant has fewer fused nodes "
                 f"than its original in {len(lost)} of {checked} (variant, level, fused op) cases"
                 + (": " + "; ".join(lost) if lost else "; no session-level fusion is lost by factoring.")
                 + f" Fused ops counted: {', '.join(FUSED)}.")
    lines += [f"- {fact}" for fact in mlp.facts + minilm.facts]
    for tau in TAUS:
        for batch in (1, 32):
            plain = ratio(minilm, "original", f"tau {tau}", batch)
            shipped_opt = ratio(minilm, "original +opt", f"tau {tau} +opt", batch)
            att = ratio(minilm, "fusable original +opt", f"fusable tau {tau} +opt", batch)
            mha = ratio(minilm, "MHA-opt original", f"MHA-opt then tau {tau}", batch)
            if plain is None and att is None:
                continue
            lines.append(
                f"- MiniLM tau {tau}, batch {batch}: compressed/original latency {fmt(plain)} at default session "
                f"optimisation; {fmt(shipped_opt)} after the optimiser on the shipped export "
                f"(same fusions on both sides); "
                f"{fmt(att)} after the optimiser on the fusable export (the original has Attention in every layer, "
                f"the compressed model loses it where an attention projection is factored); {fmt(mha)} when optimised "
                f"with MultiHeadAttention first and compressed after."
                + (f" On the fusable export the optimiser moves the ratio by {att - plain:+.3f} from the plain ratio "
                   "(the original gains Attention, the compressed model keeps fewer or none)."
                   if att is not None and plain is not None else ""))
    gain_att = {b: ratio(minilm, "fusable original", "fusable original +opt", b) for b in (1, 32)}
    lines.append("- Optimiser on the fusable original (Attention, EmbedLayerNorm, SkipLayerNorm, BiasGelu) vs default "
                 "session optimisation: latency ratio "
                 + ", ".join(f"batch {b} {fmt(v)}" for b, v in gain_att.items()) + ".")
    for a, b, what in (("fusable tau 0.8", "fusable tau 0.8 +opt",
                        "optimiser on the compressed tau 0.8 (fusable export; no Attention survives)"),
                       ("tau 0.8", "MHA-opt then tau 0.8",
                        "tau 0.8 optimised-with-MHA-first vs tau 0.8 at default session optimisation only"),
                       ("fusable original +opt", "MHA-opt then tau 0.8",
                        "MHA-opt-then-tau-0.8 vs the fully optimised original (Attention)")):
        got = {bt: ratio(minilm, a, b, bt) for bt in (1, 32)}
        lines.append(f"- {what[0].upper() + what[1:]}: latency ratio "
                     + ", ".join(f"batch {bt} {fmt(v)}" for bt, v in got.items() if v is not None) + ".")
    worst = max((d for d in mlp.diffs + minilm.diffs), key=lambda d: d.max_abs / max(d.ref_max, 1e-30))
    lines.append(f"- Numerics: the largest max |optimised - unoptimised| over all {len(mlp.diffs) + len(minilm.diffs)} "
                 f"checks (MiniLM with a right-padded attention mask) is {worst.max_abs:.3g} "
                 f"({worst.model} vs {worst.against}; "
                 f"outputs reach {worst.ref_max:.3g}).")
    holes = [d for d in minilm.diffs if d.max_abs_holes is not None]
    big = [d for d in holes if d.max_abs_holes > 1e-3]
    if big:
        exact = {d.model for d in big} == {d.model for d in holes if d.fused_attention}
        lines.append(f"- With a random 0/1 attention mask (zeros inside a row), {len(big)} of {len(holes)} "
                     f"MiniLM models differ from their unoptimised reference by more than 1e-3 (up to "
                     f"{max(d.max_abs_holes for d in big):.3g}): " + ", ".join(d.model for d in big) + ". "
                     + ("These are exactly the models with a fused Attention/MultiHeadAttention node, "
                        "compressed or not: "
                        "the optimiser turns the mask into per-row lengths, which only a right-padded mask satisfies."
                        if exact else "This is not the same set as the models with a fused attention node."))
    lines.append("")
    lines += NOTES
    lines += ["## fashion MLP", "", *mlp.lines, "#### Latency", "", *timing_table(mlp.timed), "",
              "#### Numerics (generated feed, batch 4)", "", *diff_table(mlp.diffs), ""]
    lines += ["## MiniLM", "", *minilm.lines, "#### Latency", "", *timing_table(minilm.timed), "",
              f"#### Numerics (generated feed, batch 2 x {SEQ})", "",
              "Each model at default session optimisation against the named model with all graph optimisation off; "
              "generated input_ids/token_type_ids, attention_mask right-padded (rows keep 128 and 96 tokens) "
              "or random 0/1.",
              "", *diff_table(minilm.diffs), ""]
    text = "\n".join(lines)
    write_result(text, args.out)
    log(f"wrote {args.out} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
