"""Rank policies: choose a layer's rank from its own singular values.

Every policy is a small frozen dataclass with ``choose(singular_values, shape, total_energy) -> int``
and ``need(shape)``, what it needs of the spectrum (a rank known up front, an energy share, or every
value), so the solver decomposes no further than that; it is registered by name in :data:`POLICIES`.
Policies know nothing of ONNX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np

from onnx_arsvd.errors import InvalidInputError

__all__ = [
    "DEFAULT_MAX_RANK_FRACTION",
    "DEFAULT_MIN_PARAMS",
    "POLICIES",
    "Need",
    "EnergyPolicy",
    "EntropyPolicy",
    "FixedRankPolicy",
    "RankPolicy",
    "RatioPolicy",
    "break_even_rank",
    "energy_kept",
    "energy_rank_bounds",
    "make_policy",
]


DEFAULT_MAX_RANK_FRACTION = 0.8
"""Factor only at k <= 0.8 m*n/(m+n): ranks near break-even ran 1.15x slower at batch 1
(benchmarks/latency_table.py)."""

DEFAULT_MIN_PARAMS = 4096
"""Leave weights under 64 x 64 dense: they save a few KiB, add an operator's fixed cost, and are most
often a classifier head (n = classes), whose truncation costs far more accuracy than any other layer's
(benchmarks/mlp_table.py)."""


@dataclass(frozen=True)
class Need:
    """What a rank policy needs of a spectrum: a ``rank`` known up front, or the leading values up to an
    ``energy`` share tau, or (neither) every singular value."""

    rank: int | None = None
    energy: float | None = None


class RankPolicy(Protocol):
    """Chooses the rank of one layer from its singular values (descending).

    ``singular_values`` may be only the leading values (a randomized solve); ``total_energy`` is then
    ||W||_F^2, the sum of every squared singular value.
    """

    name: ClassVar[str]

    def choose(self, singular_values: np.ndarray, shape: tuple[int, int], total_energy: float | None = None) -> int: ...

    def need(self, shape: tuple[int, int]) -> Need: ...

    def describe(self) -> str: ...


def break_even_rank(shape: tuple[int, int]) -> float:
    """Rank k* = m*n/(m+n) at which the factors A (m x k) and B (k x n) hold as many numbers as W."""
    m, n = shape
    return m * n / (m + n)


def energy_kept(singular_values: np.ndarray, rank: int, total_energy: float | None = None) -> float:
    """Share of the squared Frobenius norm (``total_energy``, default the sum over the values given) kept by
    the first ``rank`` singular values."""
    energy = np.square(singular_values.astype(np.float64))
    total = energy.sum() if total_energy is None else total_energy
    return min(1.0, float(energy[:rank].sum() / total)) if total > 0 else 1.0


def energy_rank_bounds(singular_values: np.ndarray, total_energy: float, tau: float) -> tuple[int, int]:
    """Bounds (low, high) on the exact energy rank of W, from the singular values of its projection on a
    basis (a randomized solve; each at most W's own) and ||W||_F^2.

    With P the projection and R = ||W - P W||_F^2 = total - sum of the values squared, the true top-k
    energy lies between sum_{i<=k} s_i^2 and that plus R: the exact rank is at least the first k where
    the upper curve reaches tau, and at most the first k where the lower one does (``high``, the rank
    :class:`EnergyPolicy` chooses from these values; len(values) + 1 when they never reach tau).
    """
    cumulative = np.cumsum(np.square(singular_values.astype(np.float64)))
    residual = max(0.0, total_energy - float(cumulative[-1]))
    high = int(np.searchsorted(cumulative / total_energy, tau, side="left")) + 1
    low = int(np.searchsorted((cumulative + residual) / total_energy, tau, side="left")) + 1
    return low, high


def _clip_rank(rank: int, singular_values: np.ndarray) -> int:
    return max(1, min(int(rank), len(singular_values)))


@dataclass(frozen=True)
class EnergyPolicy:
    """Smallest k whose cumulative energy sum_{i<=k} s_i^2 / sum s_i^2 reaches ``tau``."""

    tau: float = 0.99
    name: ClassVar[str] = "energy"

    def __post_init__(self) -> None:
        if not (0.0 < self.tau <= 1.0) or math.isnan(self.tau):
            raise InvalidInputError(f"tau must be in (0, 1], got {self.tau}")

    def choose(self, singular_values: np.ndarray, shape: tuple[int, int], total_energy: float | None = None) -> int:
        energy = np.cumsum(np.square(singular_values.astype(np.float64)))
        partial = total_energy is not None and len(singular_values) < min(shape)
        total = float(energy[-1]) if total_energy is None or not partial else total_energy
        if total <= 0:
            return 1
        share = energy / total  # exact: share[-1] is exactly 1.0, so tau = 1.0 keeps every value
        rank = int(np.searchsorted(share, self.tau, side="left")) + 1  # len + 1 when a partial spectrum falls short
        return max(1, min(rank, min(shape) if partial else len(singular_values)))

    def need(self, shape: tuple[int, int]) -> Need:
        return Need(energy=self.tau)

    def describe(self) -> str:
        return f"energy(tau={self.tau:g})"


@dataclass(frozen=True)
class EntropyPolicy:
    """Spectral-entropy effective rank ceil(scale * exp(H(p))), p_i = s_i / sum s_j (Roy & Vetterli)."""

    scale: float = 1.0
    name: ClassVar[str] = "entropy"

    def __post_init__(self) -> None:
        if not self.scale > 0 or math.isinf(self.scale):
            raise InvalidInputError(f"entropy scale must be a positive number, got {self.scale}")

    def choose(self, singular_values: np.ndarray, shape: tuple[int, int], total_energy: float | None = None) -> int:
        s = singular_values.astype(np.float64)
        total = s.sum()
        if total <= 0:
            return 1
        p = s[s > 0] / total
        effective_rank = math.exp(float(-(p * np.log(p)).sum()))
        return _clip_rank(math.ceil(self.scale * effective_rank - 1e-9), singular_values)

    def need(self, shape: tuple[int, int]) -> Need:
        return Need()  # the entropy of the whole normalised spectrum: every singular value

    def describe(self) -> str:
        return f"entropy(scale={self.scale:g})"


@dataclass(frozen=True)
class FixedRankPolicy:
    """The same rank ``rank`` for every layer (capped at min(m, n))."""

    rank: int = 64
    name: ClassVar[str] = "rank"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidInputError(f"rank must be a positive integer, got {self.rank!r}")

    def choose(self, singular_values: np.ndarray, shape: tuple[int, int], total_energy: float | None = None) -> int:
        return min(self.rank, min(shape))

    def need(self, shape: tuple[int, int]) -> Need:
        return Need(rank=min(self.rank, min(shape)))

    def describe(self) -> str:
        return f"rank(k={self.rank})"


@dataclass(frozen=True)
class RatioPolicy:
    """k = ceil(ratio * min(m, n)) for every layer."""

    ratio: float = 0.25
    name: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        if not (0.0 < self.ratio <= 1.0) or math.isnan(self.ratio):
            raise InvalidInputError(f"ratio must be in (0, 1], got {self.ratio}")

    def choose(self, singular_values: np.ndarray, shape: tuple[int, int], total_energy: float | None = None) -> int:
        return max(1, min(math.ceil(self.ratio * min(shape) - 1e-9), min(shape)))

    def need(self, shape: tuple[int, int]) -> Need:
        return Need(rank=self.choose(np.empty(0), shape))

    def describe(self) -> str:
        return f"ratio({self.ratio:g})"


POLICIES: dict[str, type] = {
    policy.name: policy for policy in (EnergyPolicy, EntropyPolicy, FixedRankPolicy, RatioPolicy)
}


def make_policy(name: str, **params: float | int) -> RankPolicy:
    """Build a registered policy by name; ``params`` are that policy's fields."""
    try:
        policy_class = POLICIES[name]
    except KeyError:
        raise InvalidInputError(
            f"unknown policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}"
        ) from None
    return policy_class(**params)
