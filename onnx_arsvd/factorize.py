"""Pure numpy/scipy factorization of one weight matrix; knows nothing of ONNX.

The SVD runs in float64 whatever the weight's dtype: it costs about twice the float32 time, and
makes the full-rank reconstruction exact to the weight's own rounding, so tau = 1.0 reproduces the
original model. Factors are split with the square root of the singular values on each side
(A = U sqrt(S), B = sqrt(S) V^T), which keeps both factors in the same numeric range: that matters
when they are stored back in float16.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["LpFit", "Spectrum", "factors_at_rank", "lp_factors", "spectrum", "whitened_spectrum"]


@dataclass(frozen=True)
class Spectrum:
    """Thin SVD of a weight W (m x n) = U diag(s) Vt, in float64."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.u.shape[0], self.vt.shape[1])


def spectrum(weight: np.ndarray) -> Spectrum:
    """Thin SVD of a 2-D weight, computed in float64 (divide and conquer, QR fallback)."""
    matrix = np.asarray(weight, dtype=np.float64)
    try:
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd")
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd")
    return Spectrum(u, s, vt)


def factors_at_rank(spec: Spectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors A (m x k) and B (k x n), in float64, with A @ B the best rank-k approximation of W."""
    root = np.sqrt(spec.s[:rank])
    return spec.u[:, :rank] * root, root[:, None] * spec.vt[:rank]


def whitened_spectrum(weight: np.ndarray, gram: np.ndarray, regularization: float = 1e-6) -> Spectrum:
    """The spectrum that minimises the layer's output error || X W - X A B ||_F, not || W - A B ||_F.

    With the input Gram matrix G = X^T X = L L^T (Cholesky, after adding ``regularization`` times the
    mean diagonal so an ill-conditioned or rank-deficient G still factors), the output error is
    || L^T (W - A B) ||_F: the best rank-k product is L^-T times the truncated SVD of L^T W. The returned
    ``s`` are singular values of L^T W, so energy-style policies measure output energy; ``u`` is mapped
    back through L^-T, and :func:`factors_at_rank` gives A = L^-T U_k sqrt(S_k), B = sqrt(S_k) V_k^T.
    At full rank A B = W exactly (up to rounding), whatever G is.
    """
    matrix = np.asarray(weight, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    if gram.shape != (matrix.shape[0], matrix.shape[0]):
        raise ValueError(f"Gram matrix of shape {gram.shape} does not fit a weight of shape {matrix.shape}")
    scale = max(float(np.mean(np.diag(gram))), np.finfo(np.float64).tiny)
    lower = scipy.linalg.cholesky(gram + regularization * scale * np.eye(len(gram)), lower=True)
    whitened = spectrum(lower.T @ matrix)
    u = scipy.linalg.solve_triangular(lower.T, whitened.u, lower=False)
    return Spectrum(u, whitened.s, whitened.vt)


@dataclass(frozen=True)
class LpFit:
    """Factors A = W V (m x k) and B = V^T (k x n) of the l_p subspace fit, and the objective per iteration."""

    a: np.ndarray
    b: np.ndarray
    objective: tuple[float, ...]
    converged: bool


def lp_factors(weight: np.ndarray, rank: int, p: float, *, max_iter: int = 50, tol: float = 1e-6) -> LpFit:
    """Rank-k factors whose row space V (n x k) approximately minimises sum_i dist(row_i, span V)^p.

    SVD minimises the sum of *squared* row distances, so a few far-away rows pull the subspace
    towards them; with p in [1, 2) they count less. The rows are those of W as ``X @ W`` uses it (one
    per input feature; for an embedding table, one per token), and each row is replaced by its
    projection: W ~ (W V) V^T. Solved by iteratively reweighted SVD, started from the SVD solution:
    the weights (r_i^2 + eps^2)^(p/2 - 1) make each step minimise a majorizer of the smoothed
    objective sum_i (r_i^2 + eps^2)^(p/2), so that objective never increases; eps (1e-8 of the
    root-mean-square row norm) guards rows that lie in the subspace. At p = 2 every weight is 1 and
    the result is the SVD's.
    """
    if not 1.0 <= p <= 2.0:
        raise ValueError(f"p must be in [1, 2], got {p}")
    matrix = np.asarray(weight, dtype=np.float64)
    eps = 1e-8 * float(np.sqrt(np.mean(np.sum(matrix * matrix, axis=1)))) or 1e-300
    basis = spectrum(matrix).vt[:rank].T  # n x k, the SVD start

    def residuals(v: np.ndarray) -> np.ndarray:
        return np.sum(np.square(matrix - (matrix @ v) @ v.T), axis=1)

    squared = residuals(basis)
    history = [float(np.sum((squared + eps**2) ** (p / 2)))]
    converged = p == 2.0
    for _ in range(0 if converged else max_iter):
        weights = (squared + eps**2) ** (p / 2 - 1)
        candidate = spectrum(np.sqrt(weights)[:, None] * matrix).vt[:rank].T
        candidate_squared = residuals(candidate)
        value = float(np.sum((candidate_squared + eps**2) ** (p / 2)))
        if value > history[-1]:  # rounding at convergence: keep the better subspace
            converged = True
            break
        basis, squared = candidate, candidate_squared
        history.append(value)
        if history[-2] - value <= tol * history[-2]:
            converged = True
            break
    return LpFit(matrix @ basis, basis.T, tuple(history), converged)
