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

__all__ = ["Spectrum", "factors_at_rank", "spectrum", "whitened_spectrum"]


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
