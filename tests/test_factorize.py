"""Factorization numerics: exact for exactly low-rank weights, Eckart-Young when truncated."""

from __future__ import annotations

import numpy as np
import pytest

from onnx_arsvd.factorize import factors_at_rank, lp_factors, spectrum, whitened_spectrum
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


def _inliers_and_outliers(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """200 rows near a 3-dimensional subspace of R^20, plus 8 far-away rows off it; and the inlier mask."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((20, 3)))[0]
    inliers = rng.standard_normal((200, 3)) @ basis.T + 0.01 * rng.standard_normal((200, 20))
    outliers = 5.0 * rng.standard_normal((8, 20))  # far enough to pull the SVD, few enough for l1 to ignore
    rows = np.vstack([inliers, outliers])
    return rows, np.arange(len(rows)) < 200


def _row_distances(rows: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.linalg.norm(rows - a @ b, axis=1)


def test_lp_at_p_two_is_the_svd() -> None:
    w = random_weight(40, 30, decay=0.1, seed=2)
    fit = lp_factors(w, 5, 2.0)
    np.testing.assert_allclose(fit.a @ fit.b, np.matmul(*factors_at_rank(spectrum(w), 5)), atol=1e-10)
    assert fit.converged and len(fit.objective) == 1


def test_l1_fits_the_inliers_better_than_svd() -> None:
    rows, inlier = _inliers_and_outliers()
    svd = _row_distances(rows, *factors_at_rank(spectrum(rows), 3))
    fit = lp_factors(rows, 3, 1.0)
    l1 = _row_distances(rows, fit.a, fit.b)
    assert l1[inlier].sum() < 0.5 * svd[inlier].sum()  # the outliers no longer pull the subspace
    assert l1.sum() <= svd.sum()  # and the l1 objective itself is better, as it should be


@pytest.mark.parametrize("p", [1.0, 1.5])
def test_lp_objective_never_increases(p: float) -> None:
    rows, _ = _inliers_and_outliers(seed=1)
    fit = lp_factors(rows, 3, p, max_iter=30, tol=0.0)
    assert len(fit.objective) > 2
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(fit.objective, fit.objective[1:]))


def test_lp_rejects_p_outside_one_to_two() -> None:
    with pytest.raises(ValueError, match=r"p must be in \[1, 2\]"):
        lp_factors(np.ones((4, 3)), 1, 0.5)
