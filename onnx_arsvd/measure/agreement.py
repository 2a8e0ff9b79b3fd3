"""How far one model's outputs are from another's, accumulated batch by batch; classification scores."""

from __future__ import annotations

import numpy as np

from onnx_arsvd.graph.outputs import DECISIONS, VALUES
from onnx_arsvd.measure.results import OutputComparison, TaskScores

__all__ = ["OutputAgreement", "macro_f1", "rows", "scores"]


def macro_f1(labels: np.ndarray, predictions: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over every class seen in labels or predictions."""
    scores = []
    for cls in np.union1d(labels, predictions):
        tp = np.sum((predictions == cls) & (labels == cls))
        wrong = np.sum((predictions == cls) != (labels == cls))
        scores.append(2 * tp / (2 * tp + wrong) if (2 * tp + wrong) else 0.0)
    return float(np.mean(scores))


def scores(predictions: np.ndarray, labels: np.ndarray) -> TaskScores:
    return TaskScores(accuracy=float(np.mean(predictions == labels)), macro_f1=macro_f1(labels, predictions))


def rows(array: np.ndarray) -> np.ndarray:
    """One row per sample (a 0-d or 1-d output is one sample), in float64."""
    return np.asarray(array).reshape(array.shape[0] if array.ndim > 1 else 1, -1).astype(np.float64)


def _probabilities(scores: np.ndarray, already: bool) -> np.ndarray:
    """Rows of a distribution: the rows themselves (``already``), else their softmax."""
    if already:
        return np.clip(scores, 0.0, None)
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def _decision_rows(array: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """The output as one row per decision (the last axis), real positions only when ``kept`` (batch x sequence)
    applies to it; a 2-D batch x sequence output keeps its rows, its padded positions at -inf."""
    array = np.asarray(array, np.float64)
    if kept is not None and array.ndim == 2:
        return np.where(kept, array, -np.inf)
    if kept is not None:
        return array.reshape(kept.size, -1, array.shape[-1])[kept.reshape(-1)].reshape(-1, array.shape[-1])
    return array.reshape(-1, array.shape[-1])


class OutputAgreement:
    """How far one output of the compressed model is from the original's, accumulated batch by batch.

    Only running sums, one cosine per sample and the decision counts are kept, so memory does not grow with the
    outputs' size. Besides the cosine and the relative error, an output whose last axis holds scores counts its
    decisions (argmax) that flip and the KL divergence of its distribution; a score per sample (one value) counts
    the decisions that cross its threshold (``threshold`` when given, else 0.5 for a probability and 0 for a
    logit) and its error over its spread.
    """

    def __init__(self, name: str, kind: str = VALUES, threshold: float | None = None) -> None:
        self.name, self.kind, self.threshold = name, kind, threshold
        self.max_abs_error = 0.0
        self.squared_error = 0.0
        self.squared_reference = 0.0
        self.cosines: list[np.ndarray] = []
        self.newly_nonfinite = 0
        self.decisions = self.flips = 0
        self.kl_sum = 0.0
        self.probabilities: bool | None = None  # decided on the first batch: the original's values are probabilities
        self.scalar_sums = np.zeros(3)  # sum, sum of squares of the original's score, and of the error
        self.scored = False  # the output held one score per sample

    def _decide(self, expected: np.ndarray, actual: np.ndarray, kept: np.ndarray | None) -> None:
        """Count the batch's decisions and flips (and the KL, or the score's spread)."""
        if self.kind == DECISIONS and expected.ndim == 1:  # the class scores of a model without a sample axis
            expected, actual = expected.reshape(1, -1), actual.reshape(1, -1)
        elif expected.ndim >= 1 and expected.size == len(expected):  # one score per sample
            e, a = expected.reshape(-1).astype(np.float64), actual.reshape(-1).astype(np.float64)
            if self.probabilities is None:
                self.probabilities = bool(np.all((e >= 0) & (e <= 1)))
            if self.threshold is None:
                self.threshold = 0.5 if self.probabilities else 0.0
            self.scored = True
            self.decisions += e.size
            self.flips += int(np.sum((e > self.threshold) != (a > self.threshold)))
            self.scalar_sums += (e.sum(), (e * e).sum(), ((a - e) ** 2).sum())
            return
        if expected.ndim < 2 or expected.shape[-1] < 2:
            return
        e, a = _decision_rows(expected, kept), _decision_rows(actual, kept)
        if self.probabilities is None:
            finite = e[np.isfinite(e)]
            self.probabilities = bool(finite.size and np.all((finite >= 0) & (finite <= 1))
                                      and np.allclose(np.where(np.isfinite(e), e, 0).sum(axis=1), 1, atol=1e-3))
        self.decisions += len(e)
        self.flips += int(np.sum(e.argmax(axis=1) != a.argmax(axis=1)))
        p, q = _probabilities(e, self.probabilities), _probabilities(a, self.probabilities)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * (np.log(np.clip(p, 1e-12, None)) - np.log(np.clip(q, 1e-12, None))), 0.0)
        self.kl_sum += float(np.sum(terms))

    def add(self, expected: np.ndarray, actual: np.ndarray, kept: np.ndarray | None = None) -> None:
        """Compare one batch of this output; ``kept``: its real positions (batch x sequence) when padding applies
        (the arrays then hold zeros at the padded ones)."""
        self._decide(np.asarray(expected), np.asarray(actual), kept)
        rows_e, rows_a = rows(expected), rows(actual)
        diff = rows_a - rows_e
        self.newly_nonfinite += int(np.sum(np.all(np.isfinite(rows_e), axis=1) & ~np.all(np.isfinite(rows_a), axis=1)))
        if diff.size:
            self.max_abs_error = max(self.max_abs_error, float(np.max(np.abs(diff))))
        self.squared_error += float(np.sum(diff * diff))
        self.squared_reference += float(np.sum(rows_e * rows_e))
        dots = np.sum(rows_e * rows_a, axis=1)
        norms = np.linalg.norm(rows_e, axis=1) * np.linalg.norm(rows_a, axis=1)
        self.cosines.append(np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0),
                                     np.where(np.any(diff != 0, axis=1), 0.0, 1.0)))

    def result(self) -> OutputComparison:
        cosines = np.concatenate(self.cosines) if self.cosines else np.ones(1)
        error, reference = np.sqrt(self.squared_error), np.sqrt(self.squared_reference)
        return OutputComparison(
            name=self.name,
            max_abs_error=self.max_abs_error,
            relative_error=float(error / reference) if reference > 0 else float(error),
            mean_cosine=float(np.mean(cosines)),
            min_cosine=float(np.min(cosines)),
            cosine_stderr=float(np.std(cosines, ddof=1) / np.sqrt(len(cosines))) if len(cosines) > 1 else 0.0,
            newly_nonfinite=self.newly_nonfinite,
            decisions=self.decisions,
            flips=self.flips,
            kl=self.kl_sum / self.decisions if self.decisions and not self.scalar_sums.any() else None,
            spread_error=self._spread_error(),
            threshold=self.threshold if self.scored else None,
        )

    def _spread_error(self) -> float | None:
        total, squares, errors = self.scalar_sums
        if not self.decisions or not squares:
            return None
        variance = squares / self.decisions - (total / self.decisions) ** 2
        return float(np.sqrt(errors / self.decisions / variance)) if variance > 0 else None
