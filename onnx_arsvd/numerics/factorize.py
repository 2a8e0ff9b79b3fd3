"""Pure numpy/scipy factorization of one weight matrix; knows nothing of ONNX.

The solver is picked per weight from its shape and what the rank policy needs (:class:`Need`):

- a rank k known up front (ratio, fixed rank) well below min(m, n): a randomized range finder
  (Halko et al. 2011) from a sparse random start, with max(32, k/8) oversampling and 3 LU-normalised
  power iterations, then an exact SVD of the small projected matrix (through its float64 Gram matrix).
  Most of the work is the 2q + 1 = 7 dense products of W with an m x (k + oversampling) block: at
  k = 1024 on 4096 x 4096 and 4096 x 11008 float32 weights, 4.4x and 4.2x float32 ``gesdd``'s speed at
  +0.61% and +0.66% extra error (benchmarks/results/factor_throughput.md); fewer products or less oversampling
  passed 1% extra error on MiniLM or on the slowly decaying synthetic weights;
- an energy share tau: the same range finder (from a Gaussian start) grown block by block on the
  residual until the kept share of ||W||_F^2 (known without any SVD) reaches tau with room to spare;
- every singular value (entropy), a rank near min(m, n), or a small weight: LAPACK (``gesdd``, QR
  fallback), values only when no factors are needed.

A float64 weight is decomposed in float64, every other float dtype in float32: on the shipped
models float32 and float64 factors have the same rank-k error to 1e-5 relative and the same
energy ranks (tests/test_factorize.py), at half the time and memory. Factors are split with the
square root of the singular values on each side (A = U sqrt(S), B = sqrt(S) V^T), which keeps both
factors in the same numeric range: that matters when they are stored back in float16.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.sparse

from onnx_arsvd.numerics.rank import Need

__all__ = ["EVERY_VALUE", "SOLVERS", "LpFit", "Spectrum", "decompose", "factors_at_rank", "lp_factors", "seed_for",
           "spectrum", "whitened_spectrum"]

EVERY_VALUE = Need()
"""What a policy that reads every singular value needs: the default of the solvers."""

OVERSAMPLE = 16
"""The adaptive energy solver's unit of extra basis vectors (blocks, margins; see :func:`_energy_margin`)."""
RANK_OVERSAMPLE = 32
"""Extra basis vectors beyond a known rank k: ``max(32, k // 8)`` (:func:`_oversample`). Against the former
``max(16, k // 4)`` this costs more at small k, where it is cheap and where MiniLM's weights were worst (+0.82%
at k = 96 of 384 before, +0.66% now), and 10% less work at k = 1024, where the extra error on the slowly
decaying synthetic 4096 x 4096 weight goes from +0.22% to +0.61% (benchmarks/factor_throughput.py)."""
POWER_ITERATIONS = 3
"""Power iterations of the range finder: with these settings the extra Frobenius error over the optimal
rank-k error stays under 1% on the shipped models and on flat and decaying synthetic spectra (tests). Two
crossed 1% on MiniLM's weights in an exploratory run while the solver was tuned (not kept as a benchmark)."""
FLAT_TAIL = 1.5
"""A cut in a flat stretch of the spectrum: the basis's k-th value under ``FLAT_TAIL`` times its last one. Its
directions barely differ there, and the power iterations set how well they are told apart (a rank-256 signal plus
noise, 2048 x 2048, cut at 128 or 512: +0.94% over the optimal error with 3, +0.21-0.31% with 5, +0.03-0.08% with
8). Slow decays (trained weights) look flat at any cut too: the refinement costs them half again the time."""
FLAT_EXTRA_ITERATIONS = 2
"""Power iterations added, from the basis found, where the cut is in a flat stretch (:data:`FLAT_TAIL`)."""
SKETCH_NONZEROS = 8
"""Nonzeros per row of the range finder's sparse random start (:func:`_sketch`); 8 is the usual choice."""
MIN_RANDOMIZED_DIM = 512
"""Below this min(m, n) LAPACK takes milliseconds: exact answers cost nothing there."""
MAX_RANDOMIZED_FRACTION = 0.4
"""Randomized only while the basis stays under this share of min(m, n): above it, LAPACK is as fast."""


@dataclass(frozen=True)
class Spectrum:
    """(Leading part of) the thin SVD of a weight W (m x n) ~ U diag(s) Vt.

    ``s`` holds every singular value when ``exact``, else the leading ones of a randomized basis
    (each at most the true one). ``energy`` is ||W||_F^2 either way. ``u``/``vt`` are None when only
    values were computed; they are float32 unless the weight was float64.
    """

    u: np.ndarray | None
    s: np.ndarray
    vt: np.ndarray | None
    energy: float = math.nan
    full_rank: int = 0
    solver: str = "gesdd"
    shape: tuple[int, int] = field(default=(0, 0))

    def __post_init__(self) -> None:
        if math.isnan(self.energy):
            object.__setattr__(self, "energy", float(np.sum(np.square(self.s, dtype=np.float64))))
        if not self.full_rank:
            object.__setattr__(self, "full_rank", len(self.s))
        if self.shape == (0, 0) and self.u is not None and self.vt is not None:
            object.__setattr__(self, "shape", (self.u.shape[0], self.vt.shape[1]))

    @property
    def exact(self) -> bool:
        return len(self.s) == self.full_rank


def seed_for(name: str) -> int:
    """A seed from a weight's name: the same factors whatever order or job runs it."""
    return zlib.crc32(name.encode("utf-8"))


def _work_dtype(weight: np.ndarray) -> type:
    return np.float64 if weight.dtype == np.float64 else np.float32


def _frobenius_squared(matrix: np.ndarray) -> float:
    """||W||_F^2 accumulated in float64, a block of rows at a time (no float64 copy of W)."""
    return float(sum(np.einsum("ij,ij->", block, block, dtype=np.float64) for block in np.array_split(
        matrix, max(1, matrix.shape[0] // 1024))))


def _oversample(rank: int) -> int:
    """Basis vectors beyond a known rank (see :data:`RANK_OVERSAMPLE`)."""
    return max(RANK_OVERSAMPLE, rank // 8)


def _energy_margin(rank: int) -> int:
    """Basis vectors beyond an energy rank before it is trusted: a rank hangs on the sum of the leading values,
    which the last vectors of a randomized basis underestimate (with k/4 the MiniLM ranks came out up to
    2 above the exact ones; with k/2 at most 1)."""
    return max(2 * OVERSAMPLE, rank // 2)


def _energy_rank(s: np.ndarray, energy: float, tau: float) -> int:
    """Smallest k with sum_{i<=k} s_i^2 >= tau * energy; len(s) + 1 when the values given never reach it."""
    cumulative = np.cumsum(np.square(s, dtype=np.float64))
    return int(np.searchsorted(cumulative, tau * energy * (1 - 1e-12), side="left")) + 1


def _lapack(matrix: np.ndarray, vectors: bool, energy: float) -> Spectrum:
    """Exact thin SVD (divide and conquer, QR fallback), or the singular values only."""
    shape = matrix.shape
    name = f"gesdd {matrix.dtype}"
    if not vectors:
        return Spectrum(None, scipy.linalg.svdvals(matrix, check_finite=False).astype(np.float64), None, energy,
                        min(shape), name + " (values only)", shape)
    try:
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesdd", check_finite=False)
    except np.linalg.LinAlgError:  # gesdd occasionally fails to converge; gesvd is slower but robust
        u, s, vt = scipy.linalg.svd(matrix, full_matrices=False, lapack_driver="gesvd", check_finite=False)
        name = f"gesvd {matrix.dtype}"
    return Spectrum(u, s.astype(np.float64), vt, energy, min(shape), name, shape)


def _sketch(rows: int, size: int, rng: np.random.RandomState) -> scipy.sparse.csr_matrix:
    """A sparse random sign matrix (rows x size), SKETCH_NONZEROS entries +-1 in distinct columns of each row."""
    nonzeros = min(SKETCH_NONZEROS, size)
    columns = np.argpartition(rng.random_sample((rows, size)), nonzeros - 1, axis=1)[:, :nonzeros]
    signs = rng.randint(0, 2, size=(rows, nonzeros)).astype(np.float32) * 2 - 1
    return scipy.sparse.csr_matrix((signs.ravel(), columns.ravel(), np.arange(0, rows * nonzeros + 1, nonzeros)),
                                   shape=(rows, size))


def _range_finder(matrix: np.ndarray, size: int, rng: np.random.RandomState, sparse: bool = True) -> np.ndarray:
    """Orthonormal basis (m x size) of (W W^T)^q W G (Halko et al. 2011, algorithm 4.3), W tall (m >= n).

    G is a sparse sign matrix (:func:`_sketch`), as good a start as a Gaussian one (Tropp et al. 2019) at
    nonzeros x m x n work for W G instead of size x m x n: one of the 2q + 2 large products nearly free;
    ``sparse=False`` draws the Gaussian G of scikit-learn's ``randomized_range_finder`` for the same ``rng``.
    Each product pair W (W^T Y) is normalised once, by the LU factor P L of W^T Y (n x size, the smaller side):
    between two normalisations the columns' spread grows by at most (s_1 / s_size)^2, which float32 holds, and
    the LU runs on the cheap side (scikit-learn's finder normalises after every product, 2q LUs, half of them
    m x size)."""
    if sparse:
        sample = np.asarray(_sketch(matrix.shape[1], size, rng).astype(matrix.dtype).T @ matrix.T).T  # (G^T W^T)^T
    else:
        sample = matrix @ rng.normal(size=(matrix.shape[1], size)).astype(matrix.dtype, copy=False)
    return _power(matrix, sample, POWER_ITERATIONS)


def _power(matrix: np.ndarray, sample: np.ndarray, iterations: int) -> np.ndarray:
    """An orthonormal basis of (W W^T)^iterations ``sample``, one LU normalisation per product pair."""
    for _ in range(iterations):
        probe = scipy.linalg.lu(matrix.T @ sample, permute_l=True, check_finite=False, overwrite_a=True)[0]
        sample = matrix @ probe
    return scipy.linalg.qr(sample, mode="economic", check_finite=False, overwrite_a=True)[0]


def _from_basis(matrix: np.ndarray, basis: np.ndarray, energy: float, solver: str) -> Spectrum:
    """The SVD of W restricted to the range of an orthonormal ``basis`` (m x l): exact on that range.

    The projected matrix P = basis^T W (l x n) is decomposed through its Gram matrix P P^T (l x l, float64)
    = X S^2 X^T: then S V^T = X^T P, row by row, so each value is the norm of its row of X^T P and V^T
    the normalised rows. Cheaper than ``gesdd`` on P (one symmetric l x l eigen-decomposition and two products)
    and as accurate where it matters: squaring in float64 keeps values down to 1e-8 of s_1, and every value at
    or above 1e-4 of s_1 within float32's precision of its vectors."""
    projected = basis.T @ matrix
    wide = projected.astype(np.float64)
    _, vectors = scipy.linalg.eigh(wide @ wide.T, driver="evd", check_finite=False, overwrite_a=True)
    vectors = vectors[:, ::-1].astype(matrix.dtype)  # eigh's values ascend
    rows = vectors.T @ projected  # S V^T
    s = np.linalg.norm(rows.astype(np.float64, copy=False), axis=1)
    order = np.argsort(-s, kind="stable")  # the norms descend but for rounding among the smallest
    s, rows, vectors = s[order], rows[order], vectors[:, order]
    scale = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0).astype(matrix.dtype)
    return Spectrum(basis @ vectors, s, rows * scale[:, None], energy, min(matrix.shape), solver, matrix.shape)


def _randomized(matrix: np.ndarray, rank: int, energy: float, seed: int) -> Spectrum:
    """Rank-``rank`` factors from an oversampled randomized basis; where the cut falls in a flat stretch of the
    spectrum (:data:`FLAT_TAIL`), the basis is refined by more power iterations before it is used."""
    size = rank + _oversample(rank)
    basis = _range_finder(matrix, size, np.random.RandomState(seed))
    name = f"randomized {matrix.dtype} (basis {size}, {POWER_ITERATIONS} power it.)"
    spec = _from_basis(matrix, basis, energy, name)
    if rank <= len(spec.s) and spec.s[-1] > 0 and spec.s[rank - 1] < FLAT_TAIL * spec.s[-1]:
        basis = _power(matrix, basis, FLAT_EXTRA_ITERATIONS)
        spec = _from_basis(matrix, basis, energy, f"randomized {matrix.dtype} (basis {size}, flat at the cut: "
                                                  f"{POWER_ITERATIONS} + {FLAT_EXTRA_ITERATIONS} power it.)")
    return spec


def _adaptive(matrix: np.ndarray, tau: float, energy: float, seed: int, vectors: bool, limit: int,
              cap: int | None) -> Spectrum:
    """Grow a randomized basis on the residual W - Q Q^T W (doubling it, or by the margin still missing) until
    tau of the energy is reached with an oversampling margin left; LAPACK once the basis would pass ``limit``,
    values only when a ``cap`` is given (the rank is then most likely above it: the caller decomposes again
    in the rare other case)."""
    rng = np.random.RandomState(seed)
    basis = np.zeros((matrix.shape[0], 0), dtype=matrix.dtype)
    residual = matrix
    block = max(OVERSAMPLE * 2, min(matrix.shape) // 32)
    while basis.shape[1] + block <= limit:
        new = _range_finder(residual, block, rng, sparse=False)  # the start its energy margins were measured with
        new -= basis @ (basis.T @ new)  # re-orthogonalise against the basis so far
        basis = np.hstack([basis, scipy.linalg.qr(new, mode="economic", check_finite=False)[0]])
        spec = _from_basis(matrix, basis, energy, f"adaptive randomized {matrix.dtype} (basis {basis.shape[1]}, "
                                                  f"{POWER_ITERATIONS} power it.)")
        size = basis.shape[1]
        needed = _energy_rank(spec.s, energy, tau)
        if needed + _energy_margin(needed) <= size:
            return spec
        if needed <= size:  # tau reached without the margin: grow by the margin missing (and a little), not double
            target = needed + _energy_margin(needed) + OVERSAMPLE
        else:  # the tail cannot fall faster than its largest value: at least ``estimate`` is needed
            tail = max(float(spec.s[-1]) ** 2, np.finfo(np.float64).tiny)
            estimate = int(size + (energy * tau - float(np.sum(np.square(spec.s, dtype=np.float64)))) / tail)
            target = max(estimate + max(OVERSAMPLE, estimate // 4), min(2 * size, limit))
        if target > limit:
            break
        residual = matrix - basis @ (basis.T @ matrix)
        block = max(OVERSAMPLE, target - size)
    return _lapack(matrix, vectors and cap is None, energy)


SOLVERS = ("auto", "randomized", "lapack")


def decompose(
    weight: np.ndarray,
    need: Need = EVERY_VALUE,
    *,
    vectors: bool = True,
    seed: int = 0,
    solver: str = "auto",
    cap: int | None = None,
) -> Spectrum:
    """Decompose a 2-D weight just enough for ``need``, with the solver its shape and rank call for.

    ``vectors=False`` skips the singular vectors where LAPACK runs (about 3x cheaper). ``seed`` fixes the
    randomized solvers' random numbers (use :func:`seed_for` of the weight's name). ``solver`` forces
    ``"randomized"`` (for a known rank or energy share, whatever the shape) or ``"lapack"``. ``cap`` is the
    largest rank whose factors are wanted: an energy rank too large for the randomized basis then gets
    singular values only (the caller decomposes again for factors when the rank turns out within the cap).
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of: {', '.join(SOLVERS)}")
    matrix = np.asarray(weight)
    matrix = matrix.astype(_work_dtype(matrix), copy=False)
    transposed = matrix.shape[0] < matrix.shape[1]  # the range finder works on the tall orientation
    if transposed:
        matrix = matrix.T
    energy = _frobenius_squared(matrix)
    smaller = min(matrix.shape)
    automatic = int(MAX_RANDOMIZED_FRACTION * smaller) if smaller >= MIN_RANDOMIZED_DIM else 0
    limit = {"auto": automatic, "randomized": smaller, "lapack": 0}[solver]  # the largest randomized basis
    if need.rank is not None and need.rank + _oversample(need.rank) <= limit:
        spec = _randomized(matrix, need.rank, energy, seed)
    elif need.energy is not None and need.energy < 1.0 and limit:
        spec = _adaptive(matrix, need.energy, energy, seed, vectors, limit, cap)
    else:
        spec = _lapack(matrix, vectors, energy)
    if not transposed:
        return spec
    u = None if spec.vt is None else spec.vt.T
    vt = None if spec.u is None else spec.u.T
    return Spectrum(u, spec.s, vt, spec.energy, spec.full_rank, spec.solver, (spec.shape[1], spec.shape[0]))


def spectrum(weight: np.ndarray) -> Spectrum:
    """Exact thin SVD of a 2-D weight (every singular value and vector)."""
    return decompose(weight)


def factors_at_rank(spec: Spectrum, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Factors A (m x k) and B (k x n), with A @ B the spectrum's best rank-k approximation of W."""
    if spec.u is None or spec.vt is None:
        raise ValueError("this spectrum holds singular values only: decompose with vectors=True")
    if rank > len(spec.s):
        raise ValueError(f"rank {rank} exceeds the {len(spec.s)} singular values computed")
    root = np.sqrt(spec.s[:rank]).astype(spec.u.dtype)
    return spec.u[:, :rank] * root, root[:, None] * spec.vt[:rank]


def whitened_spectrum(
    weight: np.ndarray,
    gram: np.ndarray,
    regularization: float = 1e-6,
    *,
    need: Need = EVERY_VALUE,
    seed: int = 0,
    vectors: bool = True,
) -> Spectrum:
    """The spectrum that minimises the layer's output error || X W - X A B ||_F, not || W - A B ||_F.

    With the input Gram matrix G = X^T X = L L^T (Cholesky, after adding ``regularization`` times the
    mean diagonal so an ill-conditioned or rank-deficient G still factors), the output error is
    || L^T (W - A B) ||_F: the best rank-k product is L^-T times the truncated SVD of L^T W. The returned
    ``s`` are singular values of L^T W, so energy-style policies measure output energy; ``u`` is mapped
    back through L^-T, and :func:`factors_at_rank` gives A = L^-T U_k sqrt(S_k), B = sqrt(S_k) V_k^T.
    At full rank A B = W exactly (up to rounding), whatever G is. ``need``, ``seed`` and ``vectors`` are as
    in :func:`decompose`: a known rank or energy share decomposes L^T W only that far, and the output-energy
    curve alone (every s, no vectors) costs one ``svdvals``. Computed in float64.
    """
    matrix = np.asarray(weight, dtype=np.float64)
    gram = np.asarray(gram, dtype=np.float64)
    if gram.shape != (matrix.shape[0], matrix.shape[0]):
        raise ValueError(f"Gram matrix of shape {gram.shape} does not fit a weight of shape {matrix.shape}")
    scale = max(float(np.mean(np.diag(gram))), np.finfo(np.float64).tiny)
    lower = scipy.linalg.cholesky(gram + regularization * scale * np.eye(len(gram)), lower=True)
    whitened = decompose(lower.T @ matrix, need, seed=seed, vectors=vectors)
    u = None if whitened.u is None else scipy.linalg.solve_triangular(lower.T, whitened.u, lower=False)
    return Spectrum(u, whitened.s, whitened.vt, whitened.energy, whitened.full_rank, "whitened " + whitened.solver,
                    whitened.shape)


@dataclass(frozen=True)
class LpFit:
    """Factors A = W V (m x k) and B = V^T (k x n) of the l_p subspace fit, and the objective per iteration."""

    a: np.ndarray
    b: np.ndarray
    objective: tuple[float, ...]
    converged: bool


def _leading_right_vectors(matrix: np.ndarray, rank: int) -> np.ndarray:
    """V_k (n x k) of an exact SVD."""
    vt = spectrum(matrix).vt
    assert vt is not None  # an exact SVD with vectors
    return vt[:rank].T


def lp_factors(weight: np.ndarray, rank: int, p: float, *, max_iter: int = 50, tol: float = 1e-6) -> LpFit:
    """Rank-k factors whose row space V (n x k) approximately minimises sum_i dist(row_i, span V)^p.

    SVD minimises the sum of *squared* row distances, so a few far-away rows pull the subspace
    towards them; with p in [1, 2) they count less. The rows are those of W as ``X @ W`` uses it (one
    per input feature; for an embedding table, one per token), and each row is replaced by its
    projection: W ~ (W V) V^T. Solved by iteratively reweighted SVD, started from the SVD solution:
    the weights (r_i^2 + eps^2)^(p/2 - 1) make each step minimise a majorizer of the smoothed
    objective sum_i (r_i^2 + eps^2)^(p/2), so that objective never increases; eps (1e-8 of the
    root-mean-square row norm) guards rows that lie in the subspace. At p = 2 every weight is 1 and
    the result is the SVD's. Computed in float64 with exact SVDs.
    """
    if not 1.0 <= p <= 2.0:
        raise ValueError(f"p must be in [1, 2], got {p}")
    matrix = np.asarray(weight, dtype=np.float64)
    eps = 1e-8 * float(np.sqrt(np.mean(np.sum(matrix * matrix, axis=1)))) or 1e-300
    basis = _leading_right_vectors(matrix, rank)  # n x k, the SVD start

    def residuals(v: np.ndarray) -> np.ndarray:
        return np.sum(np.square(matrix - (matrix @ v) @ v.T), axis=1)

    squared = residuals(basis)
    history = [float(np.sum((squared + eps**2) ** (p / 2)))]
    converged = p == 2.0
    for _ in range(0 if converged else max_iter):
        weights = (squared + eps**2) ** (p / 2 - 1)
        candidate = _leading_right_vectors(np.sqrt(weights)[:, None] * matrix, rank)
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
