"""ARSVD on a real transformer: all-MiniLM-L6-v2, measured on real labelled text.

For each policy, compress ``models/build/minilm.onnx`` (built by ``models/build_minilm.py``) and
measure, on gensim's polarity (200 movie-review sentences) and newsgroups (200 posts) sets: the
sentence-embedding cosine with the original (attention-mask mean pooling; mean and minimum over
sentences) and a 5-fold logistic-regression probe's accuracy on the compressed embeddings.

Usage: python -m benchmarks.minilm_table [--out benchmarks/results/minilm_table.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.results_io import MINILM_PACKAGES, compress_studied, header, write_result
from benchmarks.text_eval import BUILD, MINILM, cosine_rows, minilm_reference, probe_accuracy, sentence_embeddings
from onnx_arsvd import EnergyPolicy, EntropyPolicy, RatioPolicy, compress
from onnx_arsvd.numerics.rank import RankPolicy
from onnx_arsvd.search.budget import Budget

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "minilm_table.md"
SETS = ("polarity", "newsgroups")
POLICIES: list[RankPolicy] = [
    EnergyPolicy(0.99), EnergyPolicy(0.95), EnergyPolicy(0.9), EnergyPolicy(0.85), EnergyPolicy(0.8),
    EntropyPolicy(1.0), EntropyPolicy(0.5), RatioPolicy(0.25),
]


def _row(label: str, kept: str, scores: list[str]) -> str:
    return "| " + " | ".join([label, kept, *scores]) + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    reference = minilm_reference(SETS)
    if reference is None:
        return 1
    model, (data, originals) = MINILM, reference
    headers = ["policy", "dense params kept", *(f"{n} cosine mean / min" for n in SETS), *(f"{n} probe" for n in SETS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines.append(_row("original", "100%", ["1 / 1"] * len(SETS)
                      + [f"{probe_accuracy(originals[n], data[n][1]):.3f}" for n in SETS]))
    with tempfile.TemporaryDirectory(prefix="minilm_table_") as tmp:
        for policy in POLICIES:
            out = Path(tmp) / "compressed.onnx"
            _, report = compress(model, out, policy=policy, check=False, factor_heads=True)
            cosines, probes = [], []
            for name, (feed, labels) in data.items():
                embeddings = sentence_embeddings(out, feed)
                similarity = cosine_rows(originals[name], embeddings)
                cosines.append(f"{similarity.mean():.4f} / {similarity.min():.4f}")
                probes.append(f"{probe_accuracy(embeddings, labels):.3f}")
            kept = (f"{report.dense_params_after / report.dense_params_before:.1%} "
                    f"({report.factored}/{len(report.layers)} factored)")
            lines.append(_row(policy.describe(), kept, cosines + probes))
    lines += ["", "Activation-aware factors (`--method whitened`), calibrated on the polarity sentences and measured"
              " on the newsgroups posts (held out from the calibration), against plain SVD at the same ranks:", "",
              "| policy | factors | dense params kept | newsgroups cosine mean / min | newsgroups probe |",
              "|---|---|---:|---:|---:|"]
    feed, labels = data["newsgroups"]
    calibration = dict(data["polarity"][0])  # already loaded: the polarity tokens
    with tempfile.TemporaryDirectory(prefix="minilm_whitened_") as tmp:
        for policy in (RatioPolicy(0.25), RatioPolicy(0.4)):
            for method in ("svd", "whitened"):
                out = Path(tmp) / f"{method}.onnx"
                _, report = compress(model, out, policy=policy, method=method, check=False,
                                     calibration=calibration if method == "whitened" else None)
                embeddings = sentence_embeddings(out, feed)
                similarity = cosine_rows(originals["newsgroups"], embeddings)
                kept_fraction = report.dense_params_after / report.dense_params_before
                lines.append(f"| {policy.describe()} | {method} | {kept_fraction:.1%} | "
                             f"{similarity.mean():.4f} / {similarity.min():.4f} | "
                             f"{probe_accuracy(embeddings, labels):.3f} |")
    lines += ["", "Budget: `compress --min-cosine C --data polarity` (whitened factors; 40% of the sentences held out"
              " and reported on):", "",
              "| budget | chosen tau (global: allocation) | dense params kept | held-out output cosine mean / min |",
              "|---|---:|---:|---:|"]
    with np.load(BUILD / "polarity.npz") as archive:
        polarity = {k: archive[k] for k in archive.files if k != "labels"}
    for cosine in (0.95, 0.99):
        report, missed = compress_studied(model, budget=Budget(min_cosine=cosine), data=polarity)
        (output,) = report.verification.outputs
        chosen = "global" if report.budget["tau"] is None else f"{report.budget['tau']:.4f}"
        lines.append(f"| min cosine {cosine:g} | {chosen} | "
                     f"{report.dense_params_after / report.dense_params_before:.1%} | "
                     f"{output.mean_cosine:.4f} / {output.min_cosine:.4f}{' **missed**' if missed else ''} |")
    text = "\n".join([
        *header("ARSVD on all-MiniLM-L6-v2 (36 MatMul weights, 10.6M dense parameters)", __file__, argv,
                packages=MINILM_PACKAGES, notes=[
                    "defaults: factor only at rank <= 0.8 x break-even; probe = 5-fold logistic regression on"
                    " mean-pooled embeddings (200 sentences: fold-to-fold spread is 4-6 points on polarity)"]),
        "",
        *lines,
    ]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
