"""The run's report, built once from every stage's result."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from onnx_arsvd.measure.guard import regressions
from onnx_arsvd.measure.results import LatencyComparison, VerificationReport
from onnx_arsvd.measure.verification import ModelLike
from onnx_arsvd.methods.lowrank.model_plan import ModelPlan
from onnx_arsvd.methods.lowrank.settings import Settings
from onnx_arsvd.report.model_report import Report, nothing_factored_note
from onnx_arsvd.search.run import SearchResult

__all__ = ["Written", "build_report"]


def _describe(model: ModelLike) -> str:
    return os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"<in-memory {type(model).__name__}>"


@dataclass(frozen=True)
class Written:
    """Where the compressed model went and how large the files are."""

    output: str | None = None
    file_bytes_before: int | None = None
    file_bytes_after: int | None = None


def build_report(
    source: ModelLike,
    settings: Settings,
    planned: ModelPlan,
    weights_before: tuple[int, int],
    weights_after: tuple[int, int],
    *,
    written: Written = Written(),
    search: SearchResult | None = None,
    latency_check: Sequence[LatencyComparison] = (),
    verification: VerificationReport | None = None,
    dropped: Sequence[str] = (),
    quantized_with: str | None = None,
) -> Report:
    """The report, from every stage's result."""
    layers = planned.decisions()
    global_search = search is not None and search.allocation != "threshold"  # ranks from the search, not a policy
    return Report(
        model=_describe(source),
        policy=f"budget search: {search.allocation}" if search is not None and global_search
        else settings.describe_policy(),
        method=settings.describe(),
        max_rank_fraction=settings.max_rank_fraction,
        min_params=settings.min_params,
        layers=layers,
        skipped=planned.skipped,
        params_before=weights_before[0],
        params_after=weights_after[0],
        weight_bytes_before=weights_before[1],
        weight_bytes_after=weights_after[1],
        output=written.output,
        file_bytes_before=written.file_bytes_before,
        file_bytes_after=written.file_bytes_after,
        verification=verification,
        latency_check=list(latency_check),
        budget=search.summary() if search is not None else None,
        notes=[*([] if any(layer.changed for layer in layers) else [nothing_factored_note(layers)]), *planned.notes,
               *(f"WARNING: {text}" for text in regressions(latency_check)),
               *(f"dropped from the output: {field} (onnx_ir does not carry it)" for field in dropped),
               *([f"note: quantized with onnxruntime: {quantized_with}"] if quantized_with is not None else [])],
    )
