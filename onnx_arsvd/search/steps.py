"""A search's steps and the bisections that produce them: pure functions of a step's verdict."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["FrontierRow", "SearchStep", "bisect_index", "bisect_tau"]


@dataclass(frozen=True)
class SearchStep:
    """One candidate of the search: its threshold (or frontier point), dense parameters kept, measured
    value, verdict; for a frontier point also its predicted loss, serialized bytes, whether it was quantized and,
    when the search minimizes latency, its predicted share of the dense layers' latency."""

    tau: float | None
    params_kept: float
    value: float | None
    feasible: bool
    point: int | None = None
    predicted_loss: float | None = None
    model_bytes: int | None = None
    quantized: bool = False
    latency: float | None = None


@dataclass(frozen=True)
class FrontierRow:
    """One variant measured on the held-out part: its serialized bytes, dense parameters kept, the
    lowest mean output cosine over the outputs and, with labels, the accuracy drop in points."""

    variant: str
    model_bytes: int
    params_kept: float
    mean_cosine: float
    accuracy_drop: float | None = None
    flip_share: float | None = None
    """The largest share of decisions flipped over the outputs that decide."""

    def as_dict(self) -> dict[str, object]:
        """The row as the report shows it (no accuracy_drop key without labels, no flip_share without a deciding
        output)."""
        row: dict[str, object] = {"variant": self.variant, "model_bytes": self.model_bytes,
                                  "params_kept": self.params_kept, "mean_cosine": self.mean_cosine}
        if self.accuracy_drop is not None:
            row["accuracy_drop"] = self.accuracy_drop
        if self.flip_share is not None:
            row["flip_share"] = self.flip_share
        return row


def bisect_tau(
    evaluate: Callable[[float], SearchStep],
    steps: int,
    *,
    low: float = 1e-6,
    high: float = 1.0,
    feasible_above: bool = True,
) -> tuple[SearchStep, list[SearchStep]]:
    """The feasible step nearest the feasibility boundary, found by bisection on [low, high], and every step.

    With ``feasible_above`` (an accuracy budget: more energy kept, more accurate) the answer is the
    smallest feasible tau and ``high`` is tried first; otherwise (a parameter budget: more energy
    kept, more parameters) the largest feasible tau, and ``low`` is tried first. The first step is
    the safe end, so an infeasible search returns it, marked infeasible.
    """
    best = evaluate(high if feasible_above else low)
    tried = [best]
    if not best.feasible:
        return best, tried
    for _ in range(steps):
        middle = (low + high) / 2
        step = evaluate(middle)
        tried.append(step)
        if step.feasible == feasible_above:  # the boundary lies below middle
            high = middle
        else:
            low = middle
        if step.feasible:
            best = step
        if math.isclose(low, high, abs_tol=1e-6):
            break
    return best, tried


def bisect_index(evaluate: Callable[[int], SearchStep], count: int, steps: int, *,
                 feasible_above: bool = True) -> tuple[SearchStep, list[SearchStep]]:
    """The feasible index in [0, count) nearest the feasibility boundary by bisection, and every step.

    Feasibility is taken as monotone in the index (a frontier: more cost, less predicted loss). With
    ``feasible_above`` (an accuracy budget) the answer is the smallest feasible index and the last (safest)
    is tried first; otherwise (a latency target: more cost, slower) the largest, and index 0 is tried
    first. An infeasible search returns that first step, marked infeasible.
    """
    safe = count - 1 if feasible_above else 0
    best = evaluate(safe)
    tried = [best]
    if not best.feasible:
        return best, tried
    low, high = (-1, safe) if feasible_above else (safe, count)  # the feasible end is high, resp. low
    for _ in range(steps):
        if high - low <= 1:
            break
        middle = (low + high) // 2
        step = evaluate(middle)
        tried.append(step)
        if step.feasible:
            best = step
        if step.feasible == feasible_above:
            high = middle
        else:
            low = middle
    return best, tried
