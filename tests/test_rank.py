"""Rank policies on known spectra; no ONNX involved."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.numerics.rank import (
    EnergyPolicy,
    EntropyPolicy,
    FixedRankPolicy,
    Need,
    RatioPolicy,
    break_even_rank,
    energy_kept,
    energy_rank_bounds,
    make_policy,
)

SPECTRUM = np.array([4.0, 2.0, 1.0, 0.5, 0.25])  # energies 16, 4, 1, .25, .0625: total 21.3125


def brute_force_energy_rank(s: np.ndarray, tau: float) -> int:
    total = np.sum(s**2)
    return next(k for k in range(1, len(s) + 1) if np.sum(s[:k] ** 2) / total >= tau)


@pytest.mark.parametrize("tau", [0.1, 0.75, 16 / 21.3125, 0.9, 0.95, 0.99, 0.999, 1.0])
def test_energy_is_smallest_rank_reaching_tau(tau: float) -> None:
    assert EnergyPolicy(tau).choose(SPECTRUM, (5, 5)) == brute_force_energy_rank(SPECTRUM, tau)


def test_energy_tau_one_keeps_every_singular_value() -> None:
    s = np.linspace(10, 1e-4, 50)
    assert EnergyPolicy(1.0).choose(s, (50, 60)) == 50


def test_energy_exact_threshold_counts_as_reached() -> None:
    # 16 / 21.3125 is reached by k = 1 exactly: "smallest k whose share reaches tau"
    assert EnergyPolicy(16 / 21.3125).choose(SPECTRUM, (5, 5)) == 1


def test_entropy_rank_of_flat_and_single_spectra() -> None:
    assert EntropyPolicy().choose(np.ones(20), (20, 30)) == 20
    assert EntropyPolicy().choose(np.array([3.0, 0, 0, 0]), (4, 4)) == 1
    assert EntropyPolicy(scale=0.5).choose(np.ones(20), (20, 30)) == 10


def test_entropy_matches_definition() -> None:
    p = SPECTRUM / SPECTRUM.sum()
    expected = math.ceil(math.exp(-np.sum(p * np.log(p))))
    assert EntropyPolicy().choose(SPECTRUM, (5, 5)) == expected


def test_fixed_and_ratio_ranks() -> None:
    s = np.ones(64)
    assert FixedRankPolicy(8).choose(s, (64, 100)) == 8
    assert FixedRankPolicy(500).choose(s, (64, 100)) == 64
    assert RatioPolicy(0.25).choose(s, (64, 100)) == 16
    assert RatioPolicy(0.01).choose(s, (64, 100)) == 1


def test_break_even_and_energy_kept() -> None:
    assert break_even_rank((784, 512)) == pytest.approx(784 * 512 / 1296)
    assert energy_kept(SPECTRUM, 2) == pytest.approx(20 / 21.3125)
    assert energy_kept(SPECTRUM, 5) == 1.0


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("energy", {"tau": 0.0}, "tau must be in (0, 1]"),
        ("energy", {"tau": 1.5}, "tau must be in (0, 1]"),
        ("energy", {"tau": float("nan")}, "tau must be in (0, 1]"),
        ("entropy", {"scale": -1.0}, "entropy scale must be a positive number"),
        ("rank", {"rank": 0}, "rank must be a positive integer"),
        ("ratio", {"ratio": 2.0}, "ratio must be in (0, 1]"),
        ("svd++", {}, "unknown policy 'svd++'; choose one of: energy, entropy, rank, ratio"),
    ],
)
def test_invalid_policy_settings_raise_clear_errors(name: str, params: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        make_policy(name, **params)


def test_energy_on_a_partial_spectrum_uses_the_total_energy() -> None:
    leading = SPECTRUM[:3]  # 16 + 4 + 1 = 21 of 21.3125
    assert EnergyPolicy(0.9).choose(leading, (5, 5), total_energy=21.3125) == 2
    assert EnergyPolicy(0.99).choose(leading, (5, 5), total_energy=21.3125) == 4  # beyond the values given
    assert energy_kept(leading, 2, total_energy=21.3125) == pytest.approx(20 / 21.3125)


def test_energy_rank_bounds_hold_for_projections_of_random_matrices() -> None:
    """For the values of Q^T W (any orthonormal Q), the exact energy rank lies in [low, high]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((80, 60)) * np.exp(-0.05 * np.arange(60))
    exact = np.linalg.svd(w, compute_uv=False)
    total = float(np.sum(w**2))
    for size in (10, 25, 40):
        q, _ = np.linalg.qr(w @ rng.standard_normal((60, size)))
        partial = np.linalg.svd(q.T @ w, compute_uv=False)
        for tau in (0.3, 0.6, 0.8):
            low, high = energy_rank_bounds(partial, total, tau)
            rank = EnergyPolicy(tau).choose(exact, w.shape)
            assert low <= rank and (rank <= high or high == size + 1)  # size + 1: tau lies beyond the values
            assert high == EnergyPolicy(tau).choose(partial, w.shape, total_energy=total)


def test_policies_say_what_they_need() -> None:
    assert EnergyPolicy(0.8).need((64, 100)) == Need(energy=0.8)
    assert RatioPolicy(0.25).need((64, 100)) == Need(rank=16)
    assert FixedRankPolicy(500).need((64, 100)) == Need(rank=64)
    assert EntropyPolicy().need((64, 100)) == Need()
