"""The MiniLM goal, measured: smaller than INT8 alone at no more than 0.005 less cosine, not slower at batch 32.

Variants of ``models/build/minilm.onnx`` (all-MiniLM-L6-v2), each made by onnx-arsvd:

* INT8 alone (``quantization("int8")``: onnxruntime's ``quantize_dynamic``, what users already run);
* INT4 alone (MatMulNBits on every MatMul; the embedding tables stay float);
* INT8 with the embedding tables 4-bit (``--quantize int8+int4-tables``);
* the tool's budgeted answer: ``compress --min-cosine C --quantize int8+int4-tables`` with the 200
  polarity sentences as data (the search calibrates on 120 and verifies on the 80 held out), when
  ``--cosine`` is given.

Quality, on text none of them saw: the 200 newsgroups posts' whole ``last_hidden_state`` (the tool's
verification measure: mean cosine per post with the original's) and their mean-pooled sentence
embeddings (cosine with the original's); 5-fold linear-probe accuracy on polarity and newsgroups; and
Spearman's rank correlation of the embedding cosine of word pairs with human scores on wordsim353 and
simlex999 (gensim's test data; each word embedded alone, mean-pooled). Size is that of the file. Latency:
each variant timed against INT8 alone, interleaved in 3 rounds of fresh sessions, at batch 1 and 32 of
real newsgroups tokens at sequence length 128; the ratio is the median of per-pair ratios (p10-p90).

Usage: python -m benchmarks.minilm_quantization [--cosine 0.98] [--seconds 6]
       [--out benchmarks/results/minilm_quantization.md]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if not __package__:  # run as a file: import from the repository root, as python -m benchmarks.NAME does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import onnx

from benchmarks.results_io import MINILM_PACKAGES, compress_studied, header, markdown_table, write_result
from benchmarks.text_eval import (
    BUILD,
    INPUTS,
    MINILM,
    cosine_rows,
    load_text_set,
    minilm_built,
    probe_accuracy,
    sentence_embeddings,
)
from onnx_arsvd.io.models import model_file_bytes
from onnx_arsvd.measure.benchmark import compare_latency, timed_rounds
from onnx_arsvd.measure.sessions import make_session
from onnx_arsvd.methods.quantize.configs import quantization
from onnx_arsvd.search.budget import Budget

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "minilm_quantization.md"
SEQ = 128
WORD_SETS = {"wordsim353": ("wordsim353.tsv", "\t"), "simlex999": ("simlex999.txt", "\t")}


def word_pairs(name: str) -> tuple[list[tuple[str, str]], np.ndarray]:
    """The word pairs of a gensim similarity set and their human scores."""
    from models.build_minilm import gensim_test_data_dir

    filename, separator = WORD_SETS[name]
    pairs, scores = [], []
    for line in (gensim_test_data_dir() / filename).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split(separator)
        try:
            score = float(fields[2])
        except (IndexError, ValueError):  # a header line
            continue
        pairs.append((fields[0].lower(), fields[1].lower()))
        scores.append(score)
    return pairs, np.asarray(scores)


def word_feed(words: list[str]) -> dict[str, np.ndarray]:
    from models.build_minilm import load_tokenizer

    encoded = load_tokenizer()(words, padding=True, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in INPUTS}


def spearman(word_embeddings: np.ndarray, pairs: list[tuple[str, str]], scores: np.ndarray,
             index: dict[str, int]) -> float:
    """Spearman's correlation of the pairs' embedding cosines (rows of ``word_embeddings``) with the human scores."""
    from scipy.stats import spearmanr

    left = word_embeddings[[index[a] for a, _ in pairs]]
    right = word_embeddings[[index[b] for _, b in pairs]]
    return float(spearmanr(cosine_rows(left, right), scores).statistic)


def hidden_states(model: Path, feed: dict[str, np.ndarray], batch: int = 32) -> list[np.ndarray]:
    session = make_session(model)
    return [session.run(["last_hidden_state"], {k: v[s: s + batch] for k, v in feed.items()})[0]
            for s in range(0, len(feed["input_ids"]), batch)]


def output_cosine(hidden: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """Mean over samples of the cosine of the whole last_hidden_state with the original's (batch by batch)."""
    return float(np.concatenate([
        cosine_rows(h.reshape(len(h), -1).astype(np.float64), r.reshape(len(r), -1).astype(np.float64))
        for h, r in zip(hidden, reference, strict=True)]).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cosine", type=float, help="also run the tool's budget search at this --min-cosine")
    parser.add_argument("--seconds", type=float, default=6.0, help="timing per variant and batch size (all rounds)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if not minilm_built():
        return 1
    started, load_before = time.perf_counter(), os.getloadavg()
    polarity, newsgroups = load_text_set("polarity"), load_text_set("newsgroups")
    words = {name: word_pairs(name) for name in WORD_SETS}
    vocabulary = sorted({w for pairs, _ in words.values() for pair in pairs for w in pair})
    index = {word: i for i, word in enumerate(vocabulary)}
    vocabulary_feed = word_feed(vocabulary)
    with np.load(BUILD / "newsgroups.npz") as archive:
        tokens = {k: archive[k][:, :SEQ] for k in INPUTS}
    timing_feeds = {b: {k: np.take(v, np.arange(b) % len(v), axis=0) for k, v in tokens.items()} for b in (1, 32)}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="minilm_quantization_") as tmp:
        folder = Path(tmp)
        variants: dict[str, Path] = {"original": MINILM}
        makers: dict[str, Callable[[], onnx.ModelProto]] = {
            "INT8 alone": lambda: quantization("int8").apply(onnx.load(MINILM)),
            "INT4 alone (MatMulNBits)": lambda: quantization("int4").apply(onnx.load(MINILM)),
            "INT8 + int4 embedding tables": lambda: quantization("int8+int4-tables").apply(onnx.load(MINILM)),
        }
        for label, make in makers.items():
            path = folder / f"{len(variants)}.onnx"
            onnx.save(make(), path)
            variants[label] = path
        if args.cosine is not None:
            path = folder / "budget.onnx"
            search_started = time.perf_counter()
            report, missed = compress_studied(MINILM, path, budget=Budget(min_cosine=args.cosine),
                                              data=dict(polarity[0]), quantize="int8+int4-tables")
            label = f"tool: --min-cosine {args.cosine:g} --quantize int8+int4-tables"
            variants[label] = path
            budget = report.budget or {}
            notes.append(f"{label}: {time.perf_counter() - search_started:.0f} s; held-out budget "
                         f"{'MISSED' if missed else 'met'}; {len([r for r in report.layers if r.factored])} layers "
                         f"factored; search notes: {'; '.join(budget.get('notes', [])) or 'none'}")
        int8 = variants["INT8 alone"]
        int8_bytes = model_file_bytes(int8)
        rows = []
        reference: list[np.ndarray] = []
        original_embeddings: dict[str, np.ndarray] = {}
        for label, path in variants.items():  # the original first: the others are compared with it
            size = model_file_bytes(path)
            hidden = hidden_states(path, newsgroups[0])
            embeddings = {name: sentence_embeddings(path, feed) for name, (feed, _) in
                          (("polarity", polarity), ("newsgroups", newsgroups))}
            word_embeddings = sentence_embeddings(path, vocabulary_feed)
            if path == MINILM:
                reference, original_embeddings = hidden, embeddings
            latency = []
            for batch, feed in timing_feeds.items():
                if path == int8:
                    latency.append("1 (baseline)")
                    continue
                comparison = compare_latency("CPUExecutionProvider", batch,
                                             timed_rounds(int8, path, feed, min_seconds=args.seconds, min_runs=10))
                latency.append(f"{comparison.ratio:.2f} ({comparison.ratio_p10:.2f}-{comparison.ratio_p90:.2f})")
            rows.append([
                label, f"{size / 2**20:.1f}", f"{size / int8_bytes:.3f}",
                f"{output_cosine(hidden, reference):.4f}",
                f"{cosine_rows(original_embeddings['newsgroups'], embeddings['newsgroups']).mean():.4f}",
                *(f"{probe_accuracy(embeddings[name], data[1]):.3f}" for name, data in
                  (("polarity", polarity), ("newsgroups", newsgroups))),
                *(f"{spearman(word_embeddings, pairs, scores, index):.3f}" for pairs, scores in words.values()),
                *latency,
            ])
    columns = ["variant", "MiB", "x INT8 alone", "newsgroups output cosine", "newsgroups embedding cosine",
               "polarity probe", "newsgroups probe", "wordsim353 Spearman", "simlex999 Spearman",
               "latency vs INT8, batch 1", f"latency vs INT8, batch 32 x {SEQ}"]
    text = "\n".join([
        *header("all-MiniLM-L6-v2: quantization variants against INT8 alone", "benchmarks/minilm_quantization.py",
                argv, packages=MINILM_PACKAGES,
                notes=[f"load average {load_before[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
                       f"wall time {time.perf_counter() - started:.0f} s", *notes]),
        "",
        markdown_table(columns, rows, "l" + "r" * (len(columns) - 1)),
        "",
        f"Word pairs: {len(words['wordsim353'][0])} (wordsim353) and {len(words['simlex999'][0])} (simlex999); "
        "probes are 5-fold logistic regressions (fold-to-fold spread 4-6 points on polarity).",
    ])
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
