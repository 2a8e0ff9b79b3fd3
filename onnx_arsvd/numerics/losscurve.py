"""A layer's output error at every rank, from one decomposition; pure numpy/scipy, no ONNX.

For a layer Y = X W (W: m x n, as ``X @ W`` uses it) and its input Gram matrix C = X^T X, every rank-k
weight of the form W_k = W P (P an orthogonal projector of rank k onto a subspace of R^n) has output
error ||X W - X W_k||_F^2 = tr(M) - tr(P M), with M = W^T C W (n x n, symmetric PSD). The top-k
eigenvectors V_k of M minimise it (Eckart-Young on X W), giving factors A = W V_k (m x k) and B = V_k^T
(k x n), and the error at every k is the tail sum of M's eigenvalues: one eigen-decomposition per layer
gives the whole curve, which a search then reads without decomposing again. No Cholesky is taken, so a
singular Gram (a pixel that is always blank, a dead unit) is no failure.

A small ridge (``ridge`` times the mean diagonal of C, added to C) makes the directions the data never
excites fall back to plain weight energy instead of being arbitrary: then at k = min(m, n) the factors
reproduce W itself, not only its outputs on the calibration data. The curve reports the exact error
without the ridge, tr(M) - sum_{i<=k} v_i^T M v_i, so it matches ||X W - X A B||^2 measured on X.

When m < n (an up-projection such as MiniLM's 384 x 1536) the same subspace comes from the SVD of
R = D^(1/2) Q^T W (m x n), with C + ridge = Q D Q^T: R^T R = W^T (C + ridge) W, so its right singular
vectors are M's regularised eigenvectors, at O(m^2 n) instead of O(n^3).

When m > n (a down-projection such as 4h x h) the curve needs only M = (X W)^T (X W), n x n, and the
trace of C (for the ridge): an :class:`OutputGram`, accumulated from the layer's outputs, is m^2 / n^2
times smaller than C (16x for 4h x h). Either way a curve needs a min(m, n)^2 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

__all__ = ["LossCurve", "OutputGram", "loss_curve"]

DEFAULT_RIDGE = 1e-6


@dataclass(frozen=True)
class OutputGram:
    """What the curve of a weight with m >= n needs of its inputs X: M = W^T X^T X W (n x n) and tr(X^T X)."""

    matrix: np.ndarray
    input_trace: float
    input_dim: int

    def __add__(self, other: OutputGram) -> OutputGram:
        """The sum over two sets of inputs (a weight shared by layers, or another batch)."""
        return OutputGram(self.matrix + other.matrix, self.input_trace + other.input_trace, self.input_dim)


@dataclass(frozen=True)
class LossCurve:
    """One layer's optimal activation-aware factors at every rank, and their output error.

    ``projected`` = W V (m x s) and ``basis`` = V (n x s), columns ordered by the output energy they
    keep, both float32 (computed in float64, stored at the precision the factors are written in:
    half the memory of a search that holds every layer's curve); s is the ``stored_rank``, min(m, n)
    unless fewer were kept (a search keeps only the ranks it may choose). ``losses[k]`` is
    ||X W - X A_k B_k||_F^2 on the calibration inputs for every k = 0 .. min(m, n) (``losses[0]`` =
    ||X W||_F^2, the layer's output energy).
    """

    projected: np.ndarray
    basis: np.ndarray
    losses: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (self.projected.shape[0], self.basis.shape[0])

    @property
    def max_rank(self) -> int:
        """The largest rank the losses cover, min(m, n) (the factors may stop earlier: ``stored_rank``)."""
        return len(self.losses) - 1

    @property
    def stored_rank(self) -> int:
        """The largest rank whose factors the curve holds."""
        return self.projected.shape[1]

    @property
    def energy(self) -> float:
        """||X W||_F^2: the layer's output energy on the calibration inputs."""
        return float(self.losses[0])

    def rank_nearest(self, relative_error: float) -> int:
        """The rank (at least 1) whose relative output error is nearest ``relative_error``."""
        return int(np.argmin(np.abs(self.relative()[1:] - relative_error)) + 1)

    def truncated(self, keep: int) -> LossCurve:
        """The same curve holding the factors of the first ``keep`` ranks only (the losses of every rank kept)."""
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        if keep >= self.stored_rank:
            return self
        return LossCurve(self.projected[:, :keep].copy(), self.basis[:, :keep].copy(), self.losses)

    def relative(self) -> np.ndarray:
        """losses / output energy: 1 - output energy kept, at every rank (zeros for a silent layer)."""
        return self.losses / self.energy if self.energy > 0 else np.zeros_like(self.losses)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """A (m x k) and B (k x n), float32, with X A B the best rank-k approximation of X W.

        Each pair (column of A, row of B) is rescaled to equal norms (B's rows are unit vectors
        before), so both factors share one numeric range when stored in float16.
        """
        if not 1 <= rank <= self.stored_rank:
            raise ValueError(f"rank must be in [1, {self.stored_rank}] (the factors stored), got {rank}")
        a, b = self.projected[:, :rank], self.basis[:, :rank].T
        scale = np.sqrt(np.linalg.norm(a, axis=0))
        scale[scale == 0] = 1.0
        return a / scale, b * scale[:, None]


def loss_curve(weight: np.ndarray, gram: np.ndarray | OutputGram, ridge: float = DEFAULT_RIDGE) -> LossCurve:
    """The loss curve of ``weight`` (m x n) for inputs whose Gram matrix X^T X is ``gram`` (m x m), or
    (m >= n) whose :class:`OutputGram` it is."""
    w = np.asarray(weight, dtype=np.float64)
    m, n = w.shape
    if isinstance(gram, OutputGram):
        if m < n:
            raise ValueError(f"a weight of shape {w.shape} has more columns than rows: it needs its input Gram")
        if gram.matrix.shape != (n, n) or gram.input_dim != m:
            raise ValueError(f"output Gram of shape {gram.matrix.shape} does not fit a weight of shape {w.shape}")
        return _tall_curve(w, (gram.matrix + gram.matrix.T) / 2, ridge * _mean(gram.input_trace / m))
    c = np.asarray(gram, dtype=np.float64)
    if c.shape != (m, m):
        raise ValueError(f"Gram matrix of shape {c.shape} does not fit a weight of shape {w.shape}")
    c = (c + c.T) / 2
    shift = ridge * _mean(float(np.mean(np.diag(c))))
    if m >= n:
        return _tall_curve(w, w.T @ (c @ w), shift)
    d, q = scipy.linalg.eigh(c + shift * np.eye(m))
    root = (np.sqrt(np.clip(d, 0.0, None))[:, None] * q.T) @ w
    try:
        basis = scipy.linalg.svd(root, full_matrices=False, lapack_driver="gesdd")[2].T
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        basis = scipy.linalg.svd(root, full_matrices=False, lapack_driver="gesvd")[2].T
    basis = basis[:, :m]
    projected = w @ basis
    kept = np.einsum("ij,ij->j", projected, c @ projected)  # ||X W v_i||^2, exact (no ridge)
    return _curve(projected, basis, kept, float(np.einsum("ij,ij->", w, c @ w)))


def _tall_curve(w: np.ndarray, output_gram: np.ndarray, shift: float) -> LossCurve:
    """m >= n: the top eigenvectors of M = W^T C W (+ the ridge's shift W^T W) span the best outputs."""
    basis = scipy.linalg.eigh(output_gram + shift * (w.T @ w))[1][:, ::-1]
    kept = np.einsum("ij,ij->j", basis, output_gram @ basis)  # ||X W v_i||^2 = v_i^T M v_i, exact (no ridge)
    return _curve(w @ basis, basis, kept, float(np.trace(output_gram)))


def _curve(projected: np.ndarray, basis: np.ndarray, kept: np.ndarray, total: float) -> LossCurve:
    losses = np.clip(total - np.concatenate([[0.0], np.cumsum(kept)]), 0.0, None)
    losses = np.minimum.accumulate(losses)  # rounding only: the exact tail never grows with k
    return LossCurve(projected.astype(np.float32), basis.astype(np.float32), losses)


def _mean(value: float) -> float:
    """A mean input energy, kept above zero so the ridge never vanishes."""
    return max(value, float(np.finfo(np.float64).tiny))
