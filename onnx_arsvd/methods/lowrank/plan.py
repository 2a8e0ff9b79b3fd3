"""Decide, weight by weight, the rank each layer gets and whether factoring it saves anything."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnx_arsvd.errors import InvalidInputError, UnsupportedModelError
from onnx_arsvd.graph.layers import Layer, WeightKey
from onnx_arsvd.methods.lowrank.decision import (
    DEFAULT_MAX_RANK_FRACTION,
    DEFAULT_MIN_PARAMS,
    LayerDecision,
)
from onnx_arsvd.methods.lowrank.layer_math import storage_problem
from onnx_arsvd.numerics.factorize import (
    MIN_RANDOMIZED_DIM,
    Spectrum,
    decompose,
    factors_at_rank,
    lp_factors,
    seed_for,
    whitened_spectrum,
)
from onnx_arsvd.numerics.rank import Need, RankPolicy, break_even_rank, energy_kept, energy_rank_bounds
from onnx_arsvd.numerics.threads import in_jobs
from onnx_arsvd.progress import progress_bar

if TYPE_CHECKING:
    from onnx_arsvd.io.spill import Spill

__all__ = ["WeightPlan", "group_by_weight", "plan_layers"]

@dataclass(frozen=True)
class WeightPlan:
    """One weight matrix, the nodes that use it, its rank and (when factored) its factors (float32, or float64
    for a float64 weight). A later stage that changes a plan makes a new one (:meth:`revised`, :meth:`kept_dense`)."""

    layers: tuple[Layer, ...]
    rank: int
    decisions: tuple[LayerDecision, ...]
    factors: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def factored(self) -> bool:
        return self.decisions[0].factored

    @property
    def changed(self) -> bool:
        """Whether the plan changes the model (a :class:`~onnx_arsvd.methods.base.UnitPlan`)."""
        return self.factored

    @property
    def rows(self) -> tuple[LayerDecision, ...]:
        """Its report rows, one per node using the weight."""
        return self.decisions

    def revised(self, **changes: object) -> WeightPlan:
        """The plan with every layer's decision changed as given (e.g. ``measured_error=...``)."""
        return replace(self, decisions=tuple(replace(d, **changes) for d in self.decisions))  # type: ignore[arg-type]

    def kept_dense(self, reason: str, **changes: object) -> WeightPlan:
        """The plan with the weight left dense, for ``reason``, and without factors."""
        return replace(self.revised(factored=False, reason=reason, **changes), factors=None)

    def without_factors(self) -> WeightPlan:
        """The plan without its factors (once they are in the graph: only the decisions are still read)."""
        return replace(self, factors=None)


LP_MAX_ITER = 50
"""Iterations of the l_p fit before it stops unconverged (and the layer's row says so)."""


def _keep_reason(shape: tuple[int, int], rank: int, max_rank_fraction: float, min_params: int) -> str:
    """Why a layer at ``rank`` stays dense, or "" when factoring it pays."""
    if shape[0] * shape[1] < min_params:
        return f"too small to pay off (< {min_params} parameters)"
    if rank > max_rank_fraction * break_even_rank(shape):
        return f"saves too little (rank > {max_rank_fraction:g} x break-even)"
    return ""


def _weight_matrix(layer: Layer) -> np.ndarray:
    array = layer.matrix()
    if not np.isfinite(array).all():
        raise UnsupportedModelError(f"weight {layer.weight_name!r} of node {layer.name!r} contains NaN or Inf")
    return array


def _release(layer: Layer) -> None:
    """Unmap a weight read from external data, so its pages stop counting in this process's memory
    (onnx_ir maps it again if it is read later)."""
    tensor = layer.tensor
    if isinstance(tensor, ir.ExternalTensor):
        try:
            tensor.release()
        except BufferError:  # an array still views the mapping: it stays until that array goes
            pass


def group_by_weight(layers: Sequence[Layer]) -> list[list[Layer]]:
    """The layers grouped by the weight they use, in order of first use."""
    groups: dict[WeightKey, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(layer.weight_key, []).append(layer)
    return list(groups.values())


def _cap(shape: tuple[int, int], max_rank_fraction: float) -> int:
    """The largest rank at which a layer of this shape is factored."""
    return math.floor(max_rank_fraction * break_even_rank(shape) + 1e-9)


def _rank_note(spec: Spectrum, policy: RankPolicy, rank: int, shape: tuple[int, int]) -> str:
    """How far a rank chosen on a randomized (partial) spectrum may be from the exact one; "" when exact."""
    need = policy.need(shape)
    if spec.exact or need.energy is None:
        return ""
    low, high = energy_rank_bounds(spec.s, spec.energy, need.energy)
    return "" if low >= rank else f"randomized spectrum: exact energy rank in [{low}, {high}]"


@dataclass(frozen=True)
class _Settings:
    policy: RankPolicy
    max_rank_fraction: float
    min_params: int
    with_factors: bool
    grams: Mapping[WeightKey, np.ndarray] | None
    cache: dict[WeightKey, Spectrum] | None
    lp_power: float | None


def _solve(first: Layer, settings: _Settings, need: Need, vectors: bool, cap: int | None = None) -> Spectrum:
    """The weight's (whitened) spectrum, decomposed as far as ``need`` asks."""
    key = first.weight_key
    matrix = _weight_matrix(first)
    seed = seed_for(key[0])
    if settings.grams is not None and key in settings.grams:
        return whitened_spectrum(matrix, settings.grams[key], need=need, seed=seed, vectors=vectors)
    return decompose(matrix, need, vectors=vectors, seed=seed, cap=cap)


def _spectrum(first: Layer, settings: _Settings, need: Need, vectors: bool, cap: int) -> Spectrum:
    """As :func:`_solve`; with a cache (a search over policies), every singular value of the weight, once:
    its whole energy curve, with vectors only where LAPACK computes them anyway (small weights)."""
    if settings.cache is None:
        return _solve(first, settings, need, vectors, cap)
    key = first.weight_key
    if key not in settings.cache:
        settings.cache[key] = _solve(first, settings, Need(), min(first.shape) < MIN_RANDOMIZED_DIM)
    return settings.cache[key]


def _plan_weight(group: list[Layer], settings: _Settings) -> WeightPlan:
    """Rank, decision and (when factored) factors of one weight; nothing else of it is kept."""
    first, shape = group[0], group[0].shape
    policy = settings.policy
    need = policy.need(shape)
    small = shape[0] * shape[1] < settings.min_params
    cap = _cap(shape, settings.max_rank_fraction)
    vectors = (settings.with_factors and settings.lp_power is None and not small
               and (need.rank is None or need.rank <= cap))
    spec = _spectrum(first, settings, need, vectors, cap)
    rank = policy.choose(spec.s, shape, spec.energy)
    reason = _keep_reason(shape, rank, settings.max_rank_fraction, settings.min_params)
    notes = [_rank_note(spec, policy, rank, shape)]
    factors = None
    if not reason and settings.with_factors:
        if settings.lp_power is not None:
            fit = lp_factors(_weight_matrix(first), rank, settings.lp_power, max_iter=LP_MAX_ITER)
            factors = (fit.a, fit.b)
            if not fit.converged:
                notes.append(f"l_p fit stopped at its iteration cap ({LP_MAX_ITER} steps) before converging")
        else:
            if spec.u is None or rank > len(spec.s):  # the rank needs more than this spectrum holds
                spec = _solve(first, settings, Need(rank=rank), True)
            factors = factors_at_rank(spec, rank)
    decisions = [
        LayerDecision(
            name=layer.name,
            op_type=layer.op_type,
            weight=layer.weight_key[0],
            shape=shape,
            dtype=layer.dtype.name.lower(),
            break_even=break_even_rank(shape),
            full_rank=min(shape),
            rank=rank,
            energy_kept=energy_kept(spec.s, rank, spec.energy),
            factored=not reason,
            reason=reason,
            shared_by=len(group),
            solver=spec.solver,
            note="; ".join(note for note in notes if note),
        )
        for layer in group
    ]
    plan = WeightPlan(layers=tuple(group), rank=rank, decisions=tuple(decisions), factors=factors)
    problem = next((p for layer in group if factors is not None and (p := storage_problem(layer, *factors))), "")
    _release(first)
    return plan.kept_dense(problem) if problem else plan  # e.g. a large Gemm alpha folded into float16 factors


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
    jobs: int = 1,
    spill: Spill | None = None,
) -> list[WeightPlan]:
    """Rank and decision for every distinct weight; factors too when ``with_factors``.

    A layer is factored when its rank is at most ``max_rank_fraction`` of break-even and its weight
    has at least ``min_params`` parameters. Each weight is decomposed only as far as the policy needs
    (:func:`onnx_arsvd.numerics.factorize.decompose`: randomized for a known rank or an energy share, LAPACK for
    every value), without vectors when it will stay dense; only its factors are kept, in float32 (float64
    for a float64 weight). A weight shared by several nodes is factored once.
    With ``grams`` (input Gram matrices by ``Layer.weight_key``) the spectra and factors are the
    activation-aware ones (:func:`onnx_arsvd.numerics.factorize.whitened_spectrum`): policies then rank the
    layer's output energy on the calibration data. A ``cache`` dict keeps every singular value of each
    weight between calls, so a search over policies decomposes every weight once; the factors at each
    call's ranks are then cut from a decomposition at that rank (the vectors of small weights are cached).
    With ``lp_power`` p the rank still comes from the SVD spectrum, and the factors from
    :func:`onnx_arsvd.numerics.factorize.lp_factors`. ``jobs`` weights are factored at once (threads, one BLAS
    thread each, capped at the cores); every weight's random numbers come from its name, so the result
    is the same whatever ``jobs`` is. With a ``spill`` each weight's factors move to disk as soon as it is
    planned (memory maps), so memory holds the factors of the weights in progress only.
    """
    if not max_rank_fraction > 0:
        raise InvalidInputError(f"max rank fraction must be positive, got {max_rank_fraction}")
    if min_params < 0:
        raise InvalidInputError(f"min params must be zero or more, got {min_params}")
    settings = _Settings(policy, max_rank_fraction, min_params, with_factors, grams, cache, lp_power)
    groups = group_by_weight(layers)
    bar = progress_bar(total=sum(group[0].shape[0] * group[0].shape[1] for group in groups), unit="param",
                       unit_scale=True, desc="factoring" if with_factors else "spectra", progress=progress)

    def planned(group: list[Layer]) -> WeightPlan:
        plan = _plan_weight(group, settings)
        if spill is None or plan.factors is None:
            return plan
        return replace(plan, factors=(spill.array(plan.factors[0]), spill.array(plan.factors[1])))

    with bar:
        return in_jobs(planned, groups, jobs, lambda plan: bar.update(plan.decisions[0].params))
