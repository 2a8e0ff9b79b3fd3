"""How far one model's outputs are from another's, accumulated batch by batch; classification scores."""

from __future__ import annotations

import numpy as np

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


class OutputAgreement:
    """How far one output of the compressed model is from the original's, accumulated batch by batch.

    Only running sums and one cosine per sample are kept, so memory does not grow with the outputs' size.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.max_abs_error = 0.0
        self.squared_error = 0.0
        self.squared_reference = 0.0
        self.cosines: list[np.ndarray] = []
        self.newly_nonfinite = 0

    def add(self, expected: np.ndarray, actual: np.ndarray) -> None:
        """Compare one batch of this output."""
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
        )
