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

__all__ = ["Spectrum", "factors_at_rank", "spectrum"]


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
