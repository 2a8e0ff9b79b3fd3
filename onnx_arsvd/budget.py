"""Rank selection under a budget: the fewest parameters that keep accuracy, without retraining.

The data is split once: a calibration part (input Gram matrices for whitened factors, and the
end-to-end checks that choose the ranks) and a held-out part, never used to choose, on which the
result is reported. Every layer's rank comes from one global threshold tau on its own *output*
energy curve (with whitened factors, s_i^2 of L^T W is the layer's output energy on the
calibration data), so sensitive layers keep more rank and robust ones less; tau is found by
bisection: the smallest tau whose model meets the budget on the calibration part. An accuracy
budget is judged by the one-sided 95% upper confidence bound of the drop, a cosine budget by the
lower bound of the mean cosine, not by the point estimates:
a search that stops exactly at the budget on one sample overshoots it on another about half the time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from onnx_arsvd.errors import InvalidInputError

__all__ = ["Budget", "SearchStep", "bisect_tau", "split_data"]


@dataclass(frozen=True)
class Budget:
    """One of: at most ``max_drop`` accuracy points lost (needs labels), a mean output cosine of at
    least ``min_cosine``, or at most ``target_params`` of the dense parameters kept."""

    max_drop: float | None = None
    min_cosine: float | None = None
    target_params: float | None = None
    holdout: float = 0.4
    seed: int = 0
    steps: int = 12

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.max_drop, self.min_cosine, self.target_params)]
        if sum(given) != 1:
            raise InvalidInputError("give exactly one budget: --max-drop, --min-cosine or --target-params")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise InvalidInputError(f"--max-drop must be a non-negative number of points, got {self.max_drop}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise InvalidInputError(f"--min-cosine must be in [-1, 1], got {self.min_cosine}")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise InvalidInputError(f"--target-params must be in (0, 1], got {self.target_params}")
        if not 0.0 < self.holdout < 1.0:
            raise InvalidInputError(f"--holdout must be in (0, 1), got {self.holdout}")
        if self.steps < 1:
            raise InvalidInputError(f"search steps must be at least 1, got {self.steps}")

    @property
    def needs_data(self) -> bool:
        return self.target_params is None

    @property
    def measure(self) -> str:
        """What each search step measures."""
        if self.max_drop is not None:
            return "accuracy drop, 95% upper bound (points)"
        return "mean output cosine, 95% lower bound" if self.min_cosine is not None else "none (parameters only)"

    def describe(self) -> str:
        if self.max_drop is not None:
            return f"at most {self.max_drop:g} accuracy points lost"
        if self.min_cosine is not None:
            return f"mean output cosine at least {self.min_cosine:g}"
        return f"at most {self.target_params:.1%} of the dense parameters"


@dataclass(frozen=True)
class SearchStep:
    """One candidate of the search: its threshold, dense parameters kept, measured value, verdict."""

    tau: float
    params_kept: float
    value: float | None
    feasible: bool


def split_data(arrays: Mapping[str, np.ndarray], holdout: float, seed: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A seeded random split of every array along the first axis: (calibration, held-out)."""
    counts = {len(a) for a in arrays.values()}
    if len(counts) != 1:
        raise InvalidInputError(f"data arrays have different sample counts {sorted(counts)}")
    (count,) = counts
    held = max(1, round(holdout * count))
    if count - held < 1:
        raise InvalidInputError(f"{count} samples are too few to split into calibration and held-out parts")
    order = np.random.default_rng(seed).permutation(count)
    calibration, held_out = np.sort(order[held:]), np.sort(order[:held])
    return ({k: a[calibration] for k, a in arrays.items()}, {k: a[held_out] for k, a in arrays.items()})


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
