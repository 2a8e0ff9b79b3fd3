"""What makes a run fail after its model is written: a budget not met, outputs gone wrong, a held-out miss."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import OutputError
from onnx_arsvd.io.arrays import DataSource
from onnx_arsvd.io.calls import Calls, is_per_call, read_calls
from onnx_arsvd.io.data import ArrayReader, input_specs, load_labelled, load_labels
from onnx_arsvd.measure.results import LatencyComparison, VerificationReport
from onnx_arsvd.methods.lowrank.settings import CalibrationSource
from onnx_arsvd.methods.quantize.configs import Quantization
from onnx_arsvd.report.model_report import Report
from onnx_arsvd.rules import DEFAULT_COSINE, DEFAULT_DROP, DEFAULT_FLIPS
from onnx_arsvd.search.budget import Budget
from onnx_arsvd.search.run import SearchResult

__all__ = ["BudgetMissedError", "advice", "check_result", "checked_data", "far_from_original", "held_out_miss"]


class BudgetMissedError(OutputError):
    """The compressed model misses its budget on the held-out data (or in the final timing): nothing was placed.

    ``report`` shows the search and the held-out verification; ``model`` is the compressed model that missed, for a
    caller who wants to study it.
    """

    def __init__(self, message: str, report: Report, model: ir.Model) -> None:
        super().__init__(message)
        self.report = report
        self.model = model


def checked_data(loaded: ir.Model, data: DataSource | Calls | None, labels: np.ndarray | str | os.PathLike | None,
                  calibration: CalibrationSource | None, *, verified_on_data: bool) -> np.ndarray | None:
    """Check the data, labels and calibration arrays against the model before any work; the labels array
    (those given, else the data's own; None for calls, which carry their own). Labels the model cannot take are
    warned about here unless ``verified_on_data``: the verification reads the same data again and says it then."""
    if isinstance(data, Calls):  # checked as they were read; each call keeps its own labels
        labels = None
    elif data is not None:
        labels = load_labelled(data, labels, loaded, warn=not verified_on_data)[1]
    elif labels is not None:
        labels = load_labels(labels)
    if isinstance(calibration, (str, os.PathLike, list, tuple)) and is_per_call(calibration):
        read_calls(calibration, input_specs(loaded))
    elif isinstance(calibration, (str, os.PathLike, Mapping)):
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
        value = search.chosen.value
        bound = f" (its 95% bound: {value:.4g})" if value is not None else ""
        few = ""
        if search.budget.max_flips is not None and value is not None:  # with no flip at all the bound is ~3 / n
            few = (f"; a share of flips is bounded by about 3 / (decisions judged) even when none flip: "
                   f"{search.budget.max_flips:.2%} needs some {math.ceil(3 / search.budget.max_flips):,} decisions "
                   "on the calibration part, so give more data or a looser `max_flips`")
        raise OutputError(f"the budget ({search.budget.describe()}) is not met even with every layer's full output "
                          f"energy kept{bound}{few}; nothing written")
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
    flips = verification.flip_share
    if budget.max_flips is not None and flips is not None and flips > budget.max_flips:
        return f"the budget ({budget.describe()}) is missed on the held-out data: {flips:.2%} of decisions flipped"
    worst = min((o.mean_cosine for o in verification.outputs), default=1.0)
    if budget.min_cosine is not None and worst < budget.min_cosine:
        return f"the budget ({budget.describe()}) is missed on the held-out data: mean output cosine {worst:.4f}"
    return ""


def far_from_original(verification: VerificationReport | None, budget: Budget | None, real_data: bool) -> str:
    """How a run with a rank policy (no budget) misses, on real data, what the default budget keeps, or "".

    The floor is the default budget's own target (:data:`~onnx_arsvd.rules.DEFAULT_DROP` accuracy points with
    labels, else :data:`~onnx_arsvd.rules.DEFAULT_FLIPS` of the decisions flipped when an output decides, else a mean
    cosine of :data:`~onnx_arsvd.rules.DEFAULT_COSINE` on every output): what this tool calls close to the original
    when the user names nothing.
    """
    if budget is not None or verification is None or not real_data:
        return ""
    drop = verification.accuracy_drop
    if drop is not None:
        if drop <= DEFAULT_DROP:
            return ""
        return (f"the written model loses {drop:.2f} accuracy points on `data`, more than the default budget allows "
                f"({DEFAULT_DROP:g}): give `max_drop` {DEFAULT_DROP:g} instead of a rank `policy` to choose ranks "
                "that keep it")
    flips = verification.flip_share
    if flips is not None:
        if flips <= DEFAULT_FLIPS:
            return ""
        return (f"the written model flips {flips:.2%} of the original's decisions on `data`, more than the default "
                f"budget allows ({DEFAULT_FLIPS:.1%}): give `max_flips` {DEFAULT_FLIPS:.1%} instead of a rank "
                "`policy` to choose ranks that keep them")
    worst = min(verification.outputs, key=lambda o: o.mean_cosine, default=None)
    if worst is None or worst.mean_cosine >= DEFAULT_COSINE:
        return ""
    return (f"output {worst.name!r} of the written model has mean cosine {worst.mean_cosine:.4f} with the "
            f"original's on `data`, below the default budget's {DEFAULT_COSINE:g}: give `min_cosine` "
            f"{DEFAULT_COSINE:g} instead of a rank `policy` to choose ranks that keep it")


def advice(report: Report, search: SearchResult | None, quantize: Quantization | None,
           quantized_with: str | None) -> list[str]:
    """What the user should know on stderr: nothing changed, a requested quantization dropped (and how to ship
    quantization alone when the held-out part shows it nearly meets the budget)."""
    lines = []
    if report.factored == 0 and report.narrowed == 0 and quantized_with is None:
        lines.append("nothing was changed: no layer was factored and nothing quantized (the report's note says why); "
                     "try a lower threshold, a `policy` ratio, or `data` for a budget")
    if quantize is None or quantized_with is not None:
        return lines
    why = search.quantize_dropped if search is not None and search.quantize_dropped else "the search chose otherwise"
    lines.append(f"`quantize` ({quantize.mode}) was not applied: {why}; the written model is float")
    alone = next((row for row in search.frontier if row.variant.endswith(" alone")), None) if search else None
    if search is not None and alone is not None:
        budget = search.budget
        if budget.min_cosine is not None:
            looser = f"`min_cosine` {math.floor(alone.mean_cosine * 1e4) / 1e4:g}"
            measured = f"mean output cosine {alone.mean_cosine:.5f}"
        elif budget.max_drop is not None and alone.accuracy_drop is not None:
            looser = f"`max_drop` {math.ceil(alone.accuracy_drop * 10) / 10:g}"
            measured = f"{alone.accuracy_drop:.2f} points lost"
        else:
            return lines
        lines.append(f"{alone.variant} measures {measured} on the held-out part at {alone.model_bytes} bytes (the "
                     f"original: {search.frontier[0].model_bytes}): to ship it, give `quantize` {quantize.mode} with "
                     f"about {looser}")
    return lines
