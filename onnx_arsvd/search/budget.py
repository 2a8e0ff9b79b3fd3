"""What a search must meet: an accuracy budget, a parameter target or a latency target, and how to search."""

from __future__ import annotations

from dataclasses import dataclass

from onnx_arsvd.errors import InvalidInputError

__all__ = ["ALLOCATIONS", "COSTS", "Budget"]

ALLOCATIONS = ("global", "threshold")
COSTS = ("params", "latency")


@dataclass(frozen=True)
class Budget:
    """One of: at most ``max_drop`` accuracy points lost (needs labels), a mean output cosine of at
    least ``min_cosine``, at most ``target_params`` of the dense parameters kept, or a whole-model latency of
    at most ``target_latency`` times the original's (measured on the latency guard's provider and batch sizes)."""

    max_drop: float | None = None
    min_cosine: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    holdout: float = 0.4
    seed: int = 0
    steps: int = 12
    allocation: str = "global"
    rank_multiple: int = 8
    """Ranks are multiples of this (finer for small layers): benchmarks/results/rank_multiple.md."""
    sensitivity: bool = True
    """Map each layer's loss through its measured end-to-end response (needs data); else relative losses."""
    sequential: bool = False
    """Refit every candidate's factors layer by layer on the partially compressed model (needs data)."""
    fit_share: float = 0.5
    """Share of the calibration part that fits factors (Grams, refits) when the search fits to data; the rest judges."""
    minimize: str = "params"
    """What the search makes least within an accuracy budget: parameters, or the dense layers' measured latency
    (:mod:`onnx_arsvd.measure.latency_cost`; global allocation only)."""

    def __post_init__(self) -> None:
        given = sum(v is not None for v in (self.max_drop, self.min_cosine, self.target_params))
        if given > 1 or (given == 0 and self.target_latency is None):
            raise InvalidInputError("give one budget: max_drop, min_cosine or target_params, or target_latency "
                                    "(alone or with max_drop or min_cosine)")
        if self.target_params is not None and self.target_latency is not None:
            raise InvalidInputError("a parameter target and a latency target cannot both be met as accurately as "
                                    "possible: give one")
        if self.max_drop is not None and not self.max_drop >= 0:
            raise InvalidInputError(f"max_drop must be a non-negative number of points, got {self.max_drop}")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise InvalidInputError(f"min_cosine must be in [-1, 1], got {self.min_cosine}")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise InvalidInputError(f"target_params must be in (0, 1], got {self.target_params}")
        if self.target_latency is not None and not 0.0 < self.target_latency <= 1.0:
            raise InvalidInputError(f"target_latency must be in (0, 1], got {self.target_latency}")
        if self.target_latency is not None and self.allocation != "global":
            raise InvalidInputError("a latency target needs the global allocation")
        if not 0.0 < self.holdout < 1.0:
            raise InvalidInputError(f"holdout must be in (0, 1), got {self.holdout}")
        if not 0.0 < self.fit_share < 1.0:
            raise InvalidInputError(f"fit_share must be in (0, 1), got {self.fit_share}")
        if self.steps < 1:
            raise InvalidInputError(f"search steps must be at least 1, got {self.steps}")
        if self.allocation not in ALLOCATIONS:
            raise InvalidInputError(f"unknown allocation {self.allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
        if self.rank_multiple < 1:
            raise InvalidInputError(f"rank_multiple must be at least 1, got {self.rank_multiple}")
        if self.minimize not in COSTS:
            raise InvalidInputError(f"unknown cost to minimize {self.minimize!r}; choose one of: {', '.join(COSTS)}")
        if self.minimize == "latency" and self.target_params is not None:
            raise InvalidInputError("minimizing latency needs an accuracy budget (max_drop or min_cosine), "
                                    "not a parameter target")
        if self.minimize == "latency" and self.allocation != "global":
            raise InvalidInputError("minimizing latency needs the global allocation")
        if self.sequential and self.allocation != "global":
            raise InvalidInputError("sequential refits need the global allocation")

    @property
    def needs_data(self) -> bool:
        return self.target_params is None

    @property
    def prices_latency(self) -> bool:
        """Whether the allocation costs each rank in measured latency (to minimize it, or to meet a latency target)."""
        return self.minimize == "latency" or self.target_latency is not None

    @property
    def judges_outputs(self) -> bool:
        """Whether each search step compares the candidate's outputs with the original's (an accuracy budget)."""
        return self.max_drop is not None or self.min_cosine is not None

    @property
    def measure(self) -> str | None:
        """What each search step measures in onnxruntime; None when parameters alone decide."""
        if self.max_drop is not None:
            return "accuracy drop, 95% upper prediction bound for the held-out part (points)"
        if self.min_cosine is not None:
            return "mean output cosine, 95% lower prediction bound"
        if self.target_latency is not None:
            return "whole-model latency (x the original's), 95% upper prediction bound, slowest batch size"
        return None

    def describe(self) -> str:
        latency = (f"whole-model latency at most {self.target_latency:g}x the original's"
                   if self.target_latency is not None else "")
        if self.max_drop is not None:
            accuracy = f"at most {self.max_drop:g} accuracy points lost"
        elif self.min_cosine is not None:
            accuracy = f"mean output cosine at least {self.min_cosine:g}"
        elif self.target_params is not None:
            accuracy = f"at most {self.target_params:.1%} of the dense parameters"
        else:
            return latency
        return f"{accuracy}, {latency}" if latency else accuracy
