"""The chosen point and its neighbours measured on the held-out part, for the report: the original, quantization
alone, the chosen allocation factored, and factored + quantized."""

from __future__ import annotations

from onnx_arsvd.search.judge import Judge
from onnx_arsvd.search.space import AllocationSpace
from onnx_arsvd.search.steps import FrontierRow, SearchStep

__all__ = ["held_out_frontier"]


def held_out_frontier(space: AllocationSpace, chosen: SearchStep, held: Judge) -> tuple[list[FrontierRow], list[str]]:
    """Size and quality on the held-out part (``held``) of each variant, and a note for each way the variant that
    ships misses the budget there."""
    assert chosen.point is not None  # a global allocation chooses a point
    quantize, budget = held.quantize, space.budget
    variants = [("original", space.dense_point, False)]
    if quantize is not None:
        variants.append((f"{quantize.describe()} alone", space.dense_point, True))
    variants.append(("factored (chosen ranks)", chosen.point, False))
    if quantize is not None:
        variants.append((f"factored + {quantize.mode}", chosen.point, True))
    rows = []
    for label, point, quantized in variants:
        result, nbytes = held.measure(space.candidate(point), quantized)
        rows.append(FrontierRow(label, nbytes, space.kept(point), min(o.mean_cosine for o in result.outputs),
                                result.accuracy_drop, result.flip_share))
    shipped = rows[-1 if chosen.quantized else (2 if quantize is not None else 1)]
    notes = []
    drop = shipped.accuracy_drop
    if budget.max_drop is not None and drop is not None and drop > budget.max_drop:
        notes.append(f"MISSED on the held-out part: {shipped.variant} loses {drop:.2f} points "
                     f"(budget {budget.max_drop:g})")
    flips = shipped.flip_share
    if budget.max_flips is not None and flips is not None and flips > budget.max_flips:
        notes.append(f"MISSED on the held-out part: {shipped.variant} flips {flips:.2%} of its decisions "
                     f"(budget {budget.max_flips:.2%})")
    if budget.min_cosine is not None and shipped.mean_cosine < budget.min_cosine:
        notes.append(f"MISSED on the held-out part: {shipped.variant} has mean output cosine "
                     f"{shipped.mean_cosine:.4f} (budget {budget.min_cosine:g})")
    return rows, notes
