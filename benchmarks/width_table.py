"""Width reduction against rank only, INT8 alone and INT4 alone, at equal dense parameters, on a real transformer.

``compress(..., budget=Budget(target_params=T))`` on all-MiniLM-L6-v2 with the 200 polarity sentences as the
calibration data, (a) factoring only (the default) and (b) the search over widths (FFN units and attention
heads) and ranks together (``width=True``); each written model is also quantized with onnxruntime's
``quantize_dynamic`` (the tool's ``int8`` config). Quality is measured on the 200 newsgroups posts, which no run
saw: the mean cosine of each real token's ``last_hidden_state`` with the original's, and the sentence-embedding
cosine (attention-mask mean pooling).
A first part measures the reconstruction alone: every FFN narrowed to the same share of its units, chosen and
refitted by the tool (greedy on the least-squares loss, exit refitted with an intercept) against plain
selection by weight norm x activation norm (as onnxsim's Wanda-style pruning scores units) with and without the
refit; then the same for every attention block's heads (a head's score the sum of its columns').

With ``--model mpnet`` (all-mpnet-base-v2, built by ``models/build_mpnet.py``, the same texts tokenized for it) the
reconstruction part runs alone by default: one search on it takes over half an hour here.

Usage: python benchmarks/width_table.py [--model minilm|mpnet] [--targets 0.85 0.7 0.5] [--shares 0.75 0.5 0.25]
       [--out benchmarks/results/width_table.md]
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

import numpy as np
import onnx_ir as ir

from benchmarks.results_io import compress_studied, package_versions, write_result
from benchmarks.text_eval import BUILD, MINILM, cosine_rows, load_text_set
from onnx_arsvd.graph.layers import find_layers
from onnx_arsvd.measure.calibration import input_moments
from onnx_arsvd.measure.verification import make_session
from onnx_arsvd.methods.quantize.configs import quantization
from onnx_arsvd.methods.width.find import find_width_units
from onnx_arsvd.methods.width.method import exit_bias, unit_curves
from onnx_arsvd.methods.width.rewrite import NarrowPass, WidthPlan
from onnx_arsvd.numerics.width import refit
from onnx_arsvd.search.budget import Budget

RESULTS = Path(__file__).resolve().parent / "results"
TITLES = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}
MODELS = {  # name -> (export, calibration set, unseen set, default targets of the search, result file)
    "minilm": (MINILM, "polarity", "newsgroups", [0.85, 0.7, 0.5], RESULTS / "width_table.md"),
    "mpnet": (BUILD / "mpnet.onnx", "mpnet_polarity", "mpnet_newsgroups", [], RESULTS / "width_table_mpnet.md"),
}


def _outputs(model: str | os.PathLike | bytes, feed: dict[str, np.ndarray], batch: int = 25) -> np.ndarray:
    session = make_session(model)
    parts = [session.run(["last_hidden_state"], {k: v[i:i + batch] for k, v in feed.items()})[0]
             for i in range(0, len(feed["input_ids"]), batch)]
    return np.concatenate(parts)


class Scorer:
    """Token and sentence cosines of a model's outputs with the original's, on the unseen posts."""

    def __init__(self, model: Path, feed: dict[str, np.ndarray]) -> None:
        self.feed = feed
        self.mask = feed["attention_mask"].astype(bool)
        self.reference = _outputs(model, feed)

    def __call__(self, model: str | os.PathLike | bytes) -> tuple[float, float]:
        out = _outputs(model, self.feed)
        tokens = cosine_rows(self.reference[self.mask], out[self.mask])
        weights = self.mask[..., None].astype(np.float64)
        pooled = [(x * weights).sum(axis=1) / weights.sum(axis=1) for x in (self.reference, out)]
        return float(tokens.mean()), float(cosine_rows(*pooled).mean())


def reconstruction_rows(source: Path, calibration: dict[str, np.ndarray], score: Scorer, shares: list[float],
                        heads: bool = False) -> list[str]:
    """Every FFN (or with ``heads``, every attention block) narrowed to each share of its units (heads): the
    tool's choice and refit against plain selection."""
    model = ir.load(source)
    units = [u for u in find_width_units(find_layers(model)[0])[0] if (u.group > 1) == heads]
    moments = input_moments(model, [unit.exit for unit in units], calibration)
    curves = {c.key: c for c in unit_curves(units, moments)}

    def wanda(unit_key: object) -> np.ndarray:
        """Units by weight norm x activation norm, a head's score the sum of its columns'."""
        c = curves[unit_key]
        activation = np.sqrt(np.diag(c.moments.gram) / c.moments.rows)
        scores = np.linalg.norm(c.unit.exit.matrix(), axis=1) * activation
        return np.argsort(-scores.reshape(c.unit.units, c.unit.group).sum(axis=1))

    kind = "heads kept" if heads else "FFN units kept"
    lines = [f"| {kind} | {'heads' if heads else 'units'} chosen by | exit refitted | token cosine |"
             " sentence cosine |", "|---:|---|---|---:|---:|"]
    for share in shares:
        for chooser in ("greedy least squares (the tool)", "weight norm x activation norm"):
            for refitted in (True, False):
                narrowed = model.clone()
                plans = []
                for c in curves.values():
                    count = int(round(share * c.unit.units))
                    chosen = c.curve.kept(count) if chooser.startswith("greedy") else np.sort(wanda(c.key)[:count])
                    kept = c.unit.columns(chosen)
                    exit_matrix, bias = c.unit.exit.matrix(), exit_bias(c.unit)
                    if refitted:
                        weight, bias = refit(exit_matrix, bias, c.moments, kept)
                    else:  # plain selection: the kept rows as they are, the bias as it was
                        weight = exit_matrix[kept]
                        bias = bias if bias is not None else np.zeros(exit_matrix.shape[1])
                    plans.append(WidthPlan(c.key, kept, weight, bias, (), ()))
                NarrowPass(plans)(narrowed)
                token, sentence = score(ir.to_proto(narrowed).SerializeToString())
                lines.append(f"| {share:.0%} | {chooser} | {'yes' if refitted else 'no'} | {token:.4f} |"
                             f" {sentence:.4f} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return lines


def search_rows(source: Path, calibration: dict[str, np.ndarray], score: Scorer, targets: list[float],
                folder: Path) -> list[str]:
    """Rank only against width + rank at each target, float and INT8; INT8 and INT4 alone."""
    int8 = quantization("int8")
    lines = ["| target | method | dense params kept | layers factored / narrowed | file x original |"
             " token cosine | sentence cosine | s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    original_bytes = source.stat().st_size
    for label, mode in (("INT8 alone", "int8"), ("INT4 alone (MatMulNBits, block 32)", "int4")):
        path = folder / f"{mode}.onnx"
        path.write_bytes(quantization(mode).apply(ir.load(source), folder).SerializeToString())
        token, sentence = score(path)
        lines.append(f"| - | {label} | 100.0% | - | {path.stat().st_size / original_bytes:.3f} | {token:.4f} |"
                     f" {sentence:.4f} | - |")
        print(lines[-1], file=sys.stderr, flush=True)
    for target in targets:
        for label, width in (("rank only", False), ("width + rank (`width`)", True)):
            output = folder / f"{target}_{width}.onnx"
            started = time.perf_counter()
            report, _ = compress_studied(source, output, budget=Budget(target_params=target), data=calibration,
                                         width=width, check=False)
            seconds = time.perf_counter() - started
            kept = report.dense_params_after / report.dense_params_before
            for quantized in (False, True):
                path = output
                if quantized:
                    path = folder / f"{target}_{width}_int8.onnx"
                    path.write_bytes(int8.apply(ir.load(output), folder).SerializeToString())
                token, sentence = score(path)
                lines.append(f"| {target:.0%} | {label}{' + INT8' if quantized else ''} | {kept:.1%} |"
                             f" {report.factored} / {report.narrowed} | {path.stat().st_size / original_bytes:.3f} |"
                             f" {token:.4f} | {sentence:.4f} | {seconds:.0f} |")
                print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="minilm")
    parser.add_argument("--targets", type=float, nargs="*", default=None,
                        help="dense-parameter targets of the search (default: 0.85 0.7 0.5 on MiniLM, none on mpnet)")
    parser.add_argument("--shares", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    source, calibration_set, unseen_set, default_targets, default_out = MODELS[args.model]
    targets = default_targets if args.targets is None else args.targets
    if not source.exists():
        print(f"{source} missing: run python models/build_{args.model}.py first", file=sys.stderr)
        return 1
    started = time.perf_counter()
    calibration, score = load_text_set(calibration_set)[0], Scorer(source, load_text_set(unseen_set)[0])
    parts = [
        f"# Width reduction on {TITLES[args.model]}: reconstruction, and the search at equal parameters",
        "",
        f"- command: `python benchmarks/width_table.py --model {args.model} --targets {' '.join(map(str, targets))}"
        f" --shares {' '.join(map(str, args.shares))}`;"
        f" date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.platform()}, {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f};"
        f" {package_versions()}",
        "- calibration: the 200 polarity sentences; quality: the 200 newsgroups posts, which no run saw (token"
        " cosine = mean over real tokens of the cosine of `last_hidden_state` with the original's; sentence cosine"
        " = the same for attention-mask mean pooling)",
        "", "## Reconstruction: every FFN narrowed alike", "",
        *reconstruction_rows(source, calibration, score, args.shares),
    ]
    if args.model == "minilm":
        parts += ["", "## Reconstruction: every attention block's heads narrowed alike", "",
                  *reconstruction_rows(source, calibration, score, args.shares, heads=True)]
    if targets:
        parts += ["", "## The search at equal dense parameters (`Budget(target_params=T)`)", ""]
        with tempfile.TemporaryDirectory(prefix="width_table_") as folder:
            parts += search_rows(source, calibration, score, targets, Path(folder))
    parts += ["", f"Wall time {time.perf_counter() - started:.0f} s; load average at end {os.getloadavg()[0]:.1f}."]
    write_result("\n".join(parts) + "\n", args.out or default_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
