"""Robust l_p vs SVD factors of MiniLM's word-embedding table, measured on real text.

Only the 30522 x 384 word-embedding table is factored (every other layer stays as it is), at several
ranks, with SVD (p = 2) and with the l_p subspace fit for p = 1.5 and 1 (``--method lp``). Measured on
gensim's polarity and newsgroups sets: the sentence-embedding cosine with the original model
(attention-mask mean pooling) and a 5-fold logistic-regression probe's accuracy. The l_p paper reports
a much smaller accuracy drop than SVD for embedding layers; this checks whether that holds here.

Usage: python -m benchmarks.embedding_table [--out benchmarks/results/embedding.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_io import MINILM_PACKAGES, header, write_result
from benchmarks.text_eval import MINILM, cosine_rows, minilm_reference, probe_accuracy, sentence_embeddings
from onnx_arsvd import FixedRankPolicy, compress

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "embedding.md"
SETS = ("polarity", "newsgroups")
RANKS = (96, 160, 256)
METHODS = (("svd", 2.0), ("lp", 1.5), ("lp", 1.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    reference = minilm_reference(SETS)
    if reference is None:
        return 1
    model, (data, originals) = MINILM, reference
    headers = ["rank", "factors", "table params kept", *(f"{n} cosine mean / min" for n in SETS),
               *(f"{n} probe" for n in SETS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---:", "---"] + ["---:"] * (len(headers) - 2)) + "|",
             "| 384 (original) | - | 100% | 1 / 1 | 1 / 1 | "
             + " | ".join(f"{probe_accuracy(originals[n], data[n][1]):.3f}" for n in SETS) + " |"]
    with tempfile.TemporaryDirectory(prefix="embedding_table_") as tmp:
        for rank in RANKS:
            for method, power in METHODS:
                out = Path(tmp) / "compressed.onnx"
                _, report = compress(model, out, include=["*word_embeddings*"], embedding_policy=FixedRankPolicy(rank),
                                     method=method, lp_power=power, check=False)
                (table,) = [layer for layer in report.layers if layer.factored]
                cosines, probes = [], []
                for name, (feed, labels) in data.items():
                    embeddings = sentence_embeddings(out, feed)
                    similarity = cosine_rows(originals[name], embeddings)
                    cosines.append(f"{similarity.mean():.4f} / {similarity.min():.4f}")
                    probes.append(f"{probe_accuracy(embeddings, labels):.3f}")
                label = "SVD (p = 2)" if method == "svd" else f"l_p, p = {power:g}"
                lines.append(f"| {rank} | {label} | {table.params_after / table.params:.1%} | "
                             + " | ".join(cosines + probes) + " |")
                print(lines[-1], flush=True)
    text = "\n".join([
        *header("l_p vs SVD on all-MiniLM-L6-v2's word-embedding table (30522 x 384)", __file__, argv,
                packages=MINILM_PACKAGES, notes=[
                    "only the word-embedding table is factored; probe = 5-fold logistic regression on mean-pooled"
                    " embeddings (200 sentences per set: fold-to-fold spread 4-6 points on polarity)"]),
        "",
        *lines,
    ]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
