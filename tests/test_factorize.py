"""Factorization numerics: exact for exactly low-rank weights, Eckart-Young when truncated."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_arsvd.factorize import factors_at_rank, spectrum, whitened_spectrum
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


def _correlated_inputs(rows: int, m: int, seed: int = 0) -> np.ndarray:
    """Activations with a few dominant directions, as real layer inputs have."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((m, m)) * np.exp(-0.3 * np.arange(m))[:, None]
    return rng.standard_normal((rows, m)) @ mixing


@pytest.mark.parametrize("rank", [2, 6, 12])
def test_whitened_factors_never_lose_to_svd_on_the_outputs(rank: int) -> None:
    w = random_weight(24, 20, decay=0.05, seed=1)
    x = _correlated_inputs(500, 24)
    a_svd, b_svd = factors_at_rank(spectrum(w), rank)
    a_w, b_w = factors_at_rank(whitened_spectrum(w, x.T @ x, regularization=0.0), rank)
    error_svd = np.linalg.norm(x @ w - x @ a_svd @ b_svd)
    error_whitened = np.linalg.norm(x @ w - x @ a_w @ b_w)
    assert error_whitened <= error_svd * (1 + 1e-9)
    assert error_whitened < 0.9 * error_svd  # with correlated inputs the gain is large, not marginal
    # and the error is exactly the dropped whitened energy (Eckart-Young in the whitened space)
    spec = whitened_spectrum(w, x.T @ x, regularization=0.0)
    assert error_whitened == pytest.approx(np.sqrt(np.sum(spec.s[rank:] ** 2)), rel=1e-6)


def test_whitened_full_rank_reproduces_even_a_singular_gram() -> None:
    w = random_weight(16, 10, decay=0.1)
    x = _correlated_inputs(5, 16)  # 5 rows: G has rank 5 of 16, regularisation makes it factor
    a, b = factors_at_rank(whitened_spectrum(w, x.T @ x), 10)
    np.testing.assert_allclose(a @ b, w, atol=1e-8 * np.abs(w).max())


def test_whitened_rejects_a_gram_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="does not fit a weight of shape"):
        whitened_spectrum(np.ones((4, 3)), np.eye(3))
