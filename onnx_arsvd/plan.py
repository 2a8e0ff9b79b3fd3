"""Decide, weight by weight, the rank each layer gets and whether factoring it saves anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from onnx_arsvd.candidates import Layer, WeightKey, read_array
from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.factorize import Spectrum, factors_at_rank, lp_factors, spectrum, whitened_spectrum
from onnx_arsvd.rank import RankPolicy, break_even_rank, energy_kept
from onnx_arsvd.results import LayerTiming

__all__ = [
    "DEFAULT_MAX_RANK_FRACTION",
    "DEFAULT_MIN_PARAMS",
    "LayerDecision",
    "WeightPlan",
    "dense_decision",
    "plan_layers",
    "relative_output_error",
]

DEFAULT_MAX_RANK_FRACTION = 0.8
"""Factor only at k <= 0.8 m*n/(m+n): ranks near break-even ran 1.15x slower at batch 1 (benchmarks/latency_table.py)."""

DEFAULT_MIN_PARAMS = 4096
"""Leave weights under 64 x 64 dense: they save a few KiB, add an operator's fixed cost, and are most
often a classifier head (n = classes), whose truncation costs far more accuracy than any other layer's
(benchmarks/mlp_table.py)."""


@dataclass(frozen=True)
class LayerDecision:
    """What happens to one node: one row of the inspect/compress table."""

    name: str
    op_type: str
    weight: str
    shape: tuple[int, int]
    dtype: str
    break_even: float
    full_rank: int
    rank: int
    energy_kept: float
    factored: bool
    reason: str
    shared_by: int
    timings: tuple[LayerTiming, ...] = field(default=())
    """Latency-guard measurements, when the guard ran."""
    measured_error: float | None = None
    """Relative output error ||X(W - AB)|| / ||XW|| on held-out activations, when a budget measured it."""

    @property
    def predicted_error(self) -> float:
        """Relative error the spectrum predicts at ``rank``: sqrt(1 - energy kept) (output energy when whitened)."""
        return float(np.sqrt(max(0.0, 1.0 - self.energy_kept)))

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def params_after(self) -> int:
        return self.rank * sum(self.shape) if self.factored else self.params

    @property
    def saving(self) -> float:
        """Fraction of the weight's parameters that factors at ``rank`` remove (whether or not factored;
        negative when they would be larger)."""
        return 1.0 - self.rank * sum(self.shape) / self.params


@dataclass
class WeightPlan:
    """One weight matrix, the nodes that use it, its rank and (when factored) its float64 factors."""

    layers: list[Layer]
    rank: int
    decisions: list[LayerDecision]
    factors: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def factored(self) -> bool:
        return self.decisions[0].factored


def dense_decision(layer: Layer, reason: str) -> LayerDecision:
    """The row of a layer left dense without looking at its spectrum (e.g. excluded by name)."""
    shape = layer.shape
    return LayerDecision(
        name=layer.name, op_type=layer.op_type, weight=layer.weight_name, shape=shape,
        dtype=layer.dtype.name.lower(), break_even=break_even_rank(shape), full_rank=min(shape),
        rank=min(shape), energy_kept=1.0, factored=False, reason=reason, shared_by=1,
    )


def _keep_reason(shape: tuple[int, int], rank: int, max_rank_fraction: float, min_params: int) -> str:
    """Why a layer at ``rank`` stays dense, or "" when factoring it pays."""
    if shape[0] * shape[1] < min_params:
        return f"too small to pay off (< {min_params} parameters)"
    if rank > max_rank_fraction * break_even_rank(shape):
        return f"saves too little (rank > {max_rank_fraction:g} x break-even)"
    return ""


def _weight_matrix(layer: Layer) -> np.ndarray:
    array = read_array(layer.weight)
    if not np.isfinite(array).all():
        raise UnsupportedModelError(f"weight {layer.weight_name!r} of node {layer.name!r} contains NaN or Inf")
    return array.T if layer.transposed else array


def _group_by_weight(layers: Sequence[Layer]) -> list[list[Layer]]:
    groups: dict[WeightKey, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.weight_key, []).append(layer)
    return list(groups.values())


def plan_layers(
    layers: Sequence[Layer],
    policy: RankPolicy,
    *,
    max_rank_fraction: float = DEFAULT_MAX_RANK_FRACTION,
    min_params: int = DEFAULT_MIN_PARAMS,
    with_factors: bool = True,
    grams: Mapping[WeightKey, np.ndarray] | None = None,
    cache: dict[WeightKey, Spectrum] | None = None,
    lp_power: float | None = None,
    progress: bool = False,
) -> list[WeightPlan]:
    """Rank and decision for every distinct weight; factors too when ``with_factors``.

    A layer is factored when its rank is at most ``max_rank_fraction`` of break-even and its weight
    has at least ``min_params`` parameters. Without factors only the singular values are computed
    (about 3x cheaper), which is all ``inspect`` needs. A weight shared by several nodes is factored once.
    With ``grams`` (input Gram matrices by ``Layer.weight_key``) the spectra and factors are the
    activation-aware ones (:func:`onnx_arsvd.factorize.whitened_spectrum`): policies then rank the
    layer's output energy on the calibration data. A ``cache`` dict keeps each weight's spectrum
    between calls, so a search over policies decomposes every weight once. With ``lp_power`` p the
    rank still comes from the SVD spectrum, and the factors from :func:`onnx_arsvd.factorize.lp_factors`.
    """
    if not max_rank_fraction > 0:
        raise InvalidInputError(f"max rank fraction must be positive, got {max_rank_fraction}")
    if min_params < 0:
        raise InvalidInputError(f"min params must be zero or more, got {min_params}")
    plans: list[WeightPlan] = []
    groups = _group_by_weight(layers)
    for group in tqdm(groups, desc="factoring" if with_factors else "spectra", unit="weight", disable=None if progress else True):
        first = group[0]
        spec = cache.get(first.weight_key) if cache is not None else None
        if spec is None:
            matrix = _weight_matrix(first)
            if grams is not None and first.weight_key in grams:
                spec = whitened_spectrum(matrix, grams[first.weight_key])
            elif with_factors or cache is not None:
                spec = spectrum(matrix)
            if cache is not None:
                cache[first.weight_key] = spec
        singular_values = spec.s if spec is not None else scipy.linalg.svdvals(matrix.astype(np.float64))
        shape = first.shape
        rank = policy.choose(singular_values, shape)
        reason = _keep_reason(shape, rank, max_rank_fraction, min_params)
        factored = not reason
        decisions = [
            LayerDecision(
                name=layer.name,
                op_type=layer.op_type,
                weight=layer.weight_name,
                shape=shape,
                dtype=layer.dtype.name.lower(),
                break_even=break_even_rank(shape),
                full_rank=min(shape),
                rank=rank,
                energy_kept=energy_kept(singular_values, rank),
                factored=factored,
                reason=reason,
                shared_by=len(group),
            )
            for layer in group
        ]
        factors = None
        if factored and lp_power is not None:
            fit = lp_factors(_weight_matrix(first), rank, lp_power)
            factors = (fit.a, fit.b)
        elif factored and spec is not None:
            factors = factors_at_rank(spec, rank)
        plans.append(WeightPlan(layers=list(group), rank=rank, decisions=decisions, factors=factors))
    return plans


def relative_output_error(weight: np.ndarray, factors: tuple[np.ndarray, np.ndarray], gram: np.ndarray) -> float:
    """||X (W - A B)||_F / ||X W||_F for the inputs X whose Gram matrix is ``gram``, without X itself."""
    w = np.asarray(weight, dtype=np.float64)
    difference = w - factors[0] @ factors[1]
    denominator = float(np.sum(w * (gram @ w)))
    return float(np.sqrt(max(0.0, float(np.sum(difference * (gram @ difference)))) / denominator)) if denominator > 0 else 0.0
