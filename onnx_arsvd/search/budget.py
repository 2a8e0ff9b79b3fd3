"""What a search must meet: an accuracy budget, a parameter target or a latency target, and how to search."""

from __future__ import annotations

from dataclasses import dataclass

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.fields import option

__all__ = ["ALLOCATIONS", "COSTS", "Budget"]

ALLOCATIONS = ("global", "threshold")
COSTS = ("params", "latency")


def _share(text: str) -> float:
    """A share given as ``0.5%`` or ``0.005``."""
    try:
        return float(text.removesuffix("%")) / (100.0 if text.endswith("%") else 1.0)
    except ValueError:
        raise InvalidInputError(f"`max_flips` expects a share such as 0.5% or 0.005, got {text!r}") from None


@dataclass(frozen=True)
class Budget:
    """One of: at most ``max_drop`` accuracy points lost (needs labels), a mean output cosine of at
    least ``min_cosine``, at most ``max_flips`` of the decisions flipped, at most ``target_params`` of the dense
    parameters kept, or a whole-model latency of at most ``target_latency`` times the original's (measured on the
    latency guard's provider and batch sizes)."""

    max_drop: float | None = option(None, "at most this many accuracy points lost (needs labels: in `data`, or "
                                    "`labels`)", metavar="POINTS", default_text="")
    min_cosine: float | None = option(None, "the mean cosine of every output with the original's at least this",
                                      default_text="")
    max_flips: float | None = option(None, "at most this share of the model's decisions flipped (the argmax of class "
                                     "scores per sample or position, or a score's side of its threshold), e.g. 0.5% "
                                     "or 0.005", metavar="SHARE", parse=_share, default_text="")
    target_params: float | None = option(None, "keep at most this fraction of the dense-layer parameters, as "
                                         "accurately as possible", metavar="F", default_text="")
    target_latency: float | None = option(None, "the whole model at most F times the original's latency on the "
                                          "guard's `target` at every batch size (a 95% upper bound in the search, "
                                          "the median in the final timing), as accurately as possible; with "
                                          "`max_drop`/`min_cosine`, the fastest model within those, timed",
                                          metavar="F", default_text="")
    holdout: float = option(0.4, "share of `data` held out to report on, never used to choose ranks")
    seed: int = option(0, "seed of the data split", cli=False)
    steps: int = option(12, "bisection steps", cli=False)
    allocation: str = option("global", "global: every layer's rank from one knapsack over the layers' loss curves; "
                             "threshold: one output-energy threshold for all layers", choices=ALLOCATIONS)
    rank_multiple: int = option(8, "ranks in multiples of Q, finer for small layers (8: CPU kernels' preference; "
                                "benchmarks/results/rank_multiple.md)", metavar="Q")
    sensitivity: bool = option(True, "map each layer's loss through its measured end-to-end response (needs data); "
                               "else relative losses", cli=False)
    sequential: bool = option(False, "refit each candidate's factors layer by layer on the partially compressed "
                              "model (slower: one activation pass per layer input; global allocation only)",
                              kind="switch")
    fit_share: float = option(0.5, "share of the calibration part that fits whitened factors and refits; the others "
                              "judge candidates", metavar="F")
    minimize: str = option("params", "what the search makes least within `max_drop`/`min_cosine`: parameters, or "
                           "the dense layers' latency measured by the latency guard", choices=COSTS)

    def __post_init__(self) -> None:
        given = sum(v is not None for v in (self.max_drop, self.min_cosine, self.max_flips, self.target_params))
        if given > 1:
            raise InvalidInputError("give one budget: `max_drop`, `min_cosine`, `max_flips` or `target_params`, or "
                                    "`target_latency` (alone or with an accuracy budget)")
        if self.max_flips is not None and not 0.0 <= self.max_flips < 1.0:
            raise InvalidInputError(f"`max_flips` must be a share in [0, 1), got {self.max_flips}")
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
            raise InvalidInputError("minimizing latency needs an accuracy budget (`max_drop`, `min_cosine` or "
                                    "`max_flips`), not a parameter target")
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
        return self.max_drop is not None or self.min_cosine is not None or self.max_flips is not None

    @property
    def measure(self) -> str | None:
        """What each search step measures in onnxruntime; None when parameters alone decide."""
        if self.max_drop is not None:
            return "accuracy drop, 95% upper prediction bound for the held-out part (points)"
        if self.min_cosine is not None:
            return "mean output cosine, 95% lower prediction bound"
        if self.max_flips is not None:
            return "share of decisions flipped, 95% upper prediction bound, the output that decides worst"
        if self.target_latency is not None:
            return "whole-model latency (x the original's), 95% upper prediction bound, slowest batch size"
        return None

    @property
    def auto(self) -> bool:
        """Whether no target was given: :func:`onnx_arsvd.rules.decide` chooses one from the data."""
        return all(v is None for v in (self.max_drop, self.min_cosine, self.max_flips, self.target_params,
                                       self.target_latency))

    def describe(self) -> str:
        if self.auto:
            return "a target chosen from the data"
        latency = (f"whole-model latency at most {self.target_latency:g}x the original's"
                   if self.target_latency is not None else "")
        if self.max_drop is not None:
            accuracy = f"at most {self.max_drop:g} accuracy points lost"
        elif self.min_cosine is not None:
            accuracy = f"mean output cosine at least {self.min_cosine:g}"
        elif self.max_flips is not None:
            accuracy = f"at most {self.max_flips:.2%} of decisions flipped"
        elif self.target_params is not None:
            accuracy = f"at most {self.target_params:.1%} of the dense parameters"
        else:
            return latency
        return f"{accuracy}, {latency}" if latency else accuracy
