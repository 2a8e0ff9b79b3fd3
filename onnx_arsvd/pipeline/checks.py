"""What makes a run fail after its model is written: a budget not met, outputs gone wrong, a held-out miss."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import OutputError
from onnx_arsvd.io.data import ArrayReader, DataSource, load_labelled, load_labels
from onnx_arsvd.measure.results import LatencyComparison, VerificationReport
from onnx_arsvd.methods.lowrank.settings import CalibrationSource
from onnx_arsvd.report.model_report import Report
from onnx_arsvd.search.run import SearchResult

__all__ = ["BudgetMissedError", "check_result", "checked_data", "held_out_miss"]


class BudgetMissedError(OutputError):
    """The compressed model misses its budget on the held-out data (or in the final timing): nothing was placed.

    ``report`` shows the search and the held-out verification; ``model`` is the compressed model that missed, for a
    caller who wants to study it.
    """

    def __init__(self, message: str, report: Report, model: ir.Model) -> None:
        super().__init__(message)
        self.report = report
        self.model = model


def checked_data(loaded: ir.Model, data: DataSource | None, labels: np.ndarray | str | os.PathLike | None,
                  calibration: CalibrationSource | None, *, verified_on_data: bool) -> np.ndarray | None:
    """Check the data, labels and calibration arrays against the model before any work; the labels array
    (those given, else the data's own). Labels the model cannot take are warned about here unless
    ``verified_on_data``: the verification reads the same data again and says it then."""
    if data is not None:
        labels = load_labelled(data, labels, loaded, warn=not verified_on_data)[1]
    elif labels is not None:
        labels = load_labels(labels)
    if isinstance(calibration, (str, os.PathLike, Mapping)):
        ArrayReader(calibration, loaded)
    return labels


def check_result(verification: VerificationReport | None, search: SearchResult | None) -> None:
    """A compressed model whose outputs turn NaN/Inf, or a budget the search could not meet, is a failed run."""
    if search is not None and not search.met:
        if search.latency_bound is not None:
            raise OutputError(f"the budget ({search.budget.describe()}) is not met: the fastest model within the "
                              f"accuracy budget times at up to {search.latency_bound:.3f}x (95% bound); "
                              "nothing written")
        if search.budget.target_latency is not None and not search.budget.judges_outputs:
            raise OutputError(f"the budget ({search.budget.describe()}) is not met even by the fastest allocation "
                              "searched; nothing written")
        raise OutputError(f"the budget ({search.budget.describe()}) is not met even with every layer's full output "
                          "energy kept; nothing written")
    for output in verification.outputs if verification is not None else ():
        if output.newly_nonfinite:
            raise OutputError(f"output {output.name!r} of the compressed model is NaN or Inf on "
                              f"{output.newly_nonfinite} samples where the original's is finite; nothing written")
        if output.unrelated:
            raise OutputError(f"output {output.name!r} of the compressed model is unrelated to the original's "
                              f"(relative error {output.relative_error:.3g}, mean cosine {output.mean_cosine:.3f}: "
                              "no closer than an all-zero output); nothing written")


def held_out_miss(verification: VerificationReport | None, search: SearchResult | None, held_out: bool,
                   latency_check: Sequence[LatencyComparison] = ()) -> str:
    """How the verified model misses its budget on the held-out part (or, for a latency target, in the final
    whole-model timing), or "" when it meets it (or none applies)."""
    if search is not None and search.budget.target_latency is not None and latency_check:
        slowest = max(latency_check, key=lambda c: c.ratio)
        if slowest.ratio > search.budget.target_latency:
            return (f"the budget ({search.budget.describe()}) is missed in the final timing: {slowest.ratio:.3f}x "
                    f"at batch {slowest.batch}")
    if search is None or not held_out or verification is None:
        return ""
    budget = search.budget
    drop = verification.accuracy_drop
    if budget.max_drop is not None and drop is not None and drop > budget.max_drop:
        return f"the budget ({budget.describe()}) is missed on the held-out data: {drop:.2f} points lost"
    worst = min((o.mean_cosine for o in verification.outputs), default=1.0)
    if budget.min_cosine is not None and worst < budget.min_cosine:
        return f"the budget ({budget.describe()}) is missed on the held-out data: mean output cosine {worst:.4f}"
    return ""
