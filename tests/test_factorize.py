"""Factorization numerics: exact for exactly low-rank weights, Eckart-Young when truncated."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_arsvd.factorize import factors_at_rank, spectrum
from tests.conftest import random_weight


def test_exact_low_rank_weight_is_reproduced() -> None:
    w = random_weight(60, 40, true_rank=7)
    a, b = factors_at_rank(spectrum(w), 7)
    assert a.shape == (60, 7) and b.shape == (7, 40)
    np.testing.assert_allclose(a @ b, w, rtol=0, atol=1e-12 * np.abs(w).max())


@pytest.mark.parametrize("rank", [1, 5, 20, 39])
def test_truncation_error_is_eckart_young(rank: int) -> None:
    w = random_weight(50, 40, decay=0.1, seed=3)
    spec = spectrum(w)
    a, b = factors_at_rank(spec, rank)
    expected = np.sqrt(np.sum(spec.s[rank:] ** 2))
    assert np.linalg.norm(w - a @ b) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_factors_are_balanced() -> None:
    spec = spectrum(random_weight(30, 30, decay=0.2))
    a, b = factors_at_rank(spec, 10)
    np.testing.assert_allclose(np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=1), rtol=1e-9)


def test_float16_weight_is_factored_in_float64() -> None:
    w = random_weight(16, 12, true_rank=3).astype(np.float16)
    spec = spectrum(w)
    assert spec.s.dtype == np.float64 and spec.shape == (16, 12)
