"""Sentence-embedding measures for a transformer export: cosine with the original, linear-probe accuracy.

Used by the MiniLM tests and benchmarks on the real labelled text that ``models/build_minilm.py``
tokenizes (gensim's polarity and newsgroups sets). Needs scikit-learn for the probe.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from onnx_arsvd.measure.verification import make_session

__all__ = ["BUILD", "MINILM", "cosine_rows", "load_text_set", "minilm_built", "minilm_reference", "probe_accuracy",
           "sentence_embeddings"]

BUILD = Path(__file__).resolve().parent.parent / "models" / "build"
MINILM = BUILD / "minilm.onnx"
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def load_text_set(name: str, build: Path = BUILD) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Token arrays of ``<name>.npz`` (every array but the labels: MiniLM's three inputs, or the two an
    ``mpnet_<set>.npz`` holds), trimmed to the longest real sequence, and the labels."""
    with np.load(build / f"{name}.npz") as archive:
        length = int(archive["attention_mask"].sum(axis=1).max())
        return {k: archive[k][:, :length] for k in archive.files if k != "labels"}, archive["labels"]


def sentence_embeddings(model: str | os.PathLike | bytes, feed: dict[str, np.ndarray], batch: int = 32) -> np.ndarray:
    """Attention-mask-weighted mean of ``last_hidden_state``: one vector per sentence."""
    session = make_session(model)
    pooled = []
    for start in range(0, len(feed["input_ids"]), batch):
        part = {k: v[start : start + batch] for k, v in feed.items()}
        (hidden,) = session.run(["last_hidden_state"], part)
        mask = part["attention_mask"][..., None].astype(np.float64)
        pooled.append((hidden * mask).sum(axis=1) / mask.sum(axis=1))
    return np.concatenate(pooled)


def minilm_built() -> bool:
    """Whether the MiniLM export exists; says how to build it when not."""
    if MINILM.exists():
        return True
    print(f"{MINILM} missing: run python models/build_minilm.py first", file=sys.stderr)
    return False


def minilm_reference(
    names: tuple[str, ...],
) -> tuple[dict[str, tuple[dict[str, np.ndarray], np.ndarray]], dict[str, np.ndarray]] | None:
    """Each text set's (tokens, labels) and the original MiniLM's embeddings of it; None if the model is not built."""
    if not minilm_built():
        return None
    data = {name: load_text_set(name) for name in names}
    return data, {name: sentence_embeddings(MINILM, feed) for name, (feed, _) in data.items()}


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b``."""
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def probe_accuracy(embeddings: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Mean accuracy of a logistic-regression probe under stratified k-fold cross-validation."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(LogisticRegression(max_iter=5000), embeddings, labels, cv=splitter)))
