"""The rules that fill in what the user left open, in one place, so the CLI and the API give the same model.

- With `data`, no `policy` and no `budget`, the ranks are chosen for a budget: at most 1 accuracy point lost when
  the first output can be scored against labels (given, or the data's own), else at most 0.5% of the decisions
  flipped when an output decides (class scores, probabilities, a score per sample), else a mean output cosine of
  at least 0.99 (embeddings, hidden states); a budget given without a target (search settings only) gets the same
  target.
- The method is ``whitened`` under a budget with data (its data calibrates), else ``svd``.
- Layers that feed a graph output (classifier heads) are factored only when real inputs (`data` or
  `calibration`) check them, unless `factor_heads` says otherwise.
- A budget that prices latency (a latency target, or minimising latency) times on the default latency guard
  when none is given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping

import onnx_ir as ir

from onnx_arsvd.config import CompressOptions, FactorOptions, LatencyGuard
from onnx_arsvd.errors import InvalidInputError
from onnx_arsvd.graph.outputs import DECISIONS, SCORE, output_kinds
from onnx_arsvd.io.arrays import open_arrays
from onnx_arsvd.io.calls import Calls, described
from onnx_arsvd.io.data import label_problem
from onnx_arsvd.methods.lowrank.settings import CalibrationSource, Settings
from onnx_arsvd.numerics.rank import EnergyPolicy
from onnx_arsvd.search.budget import Budget

__all__ = ["DEFAULT_COSINE", "DEFAULT_DROP", "DEFAULT_FLIPS", "decide", "settings_of"]

logger = logging.getLogger("onnx_arsvd")

DEFAULT_DROP = 1.0
"""Accuracy points a default budget may lose, when labels score the first output."""
DEFAULT_FLIPS = 0.005
"""Share of the original's decisions a default budget may flip, without labels, when an output decides (class
scores, probabilities, a score per sample): 1 in 200."""
DEFAULT_COSINE = 0.99
"""Mean output cosine a default budget keeps, without labels, when no output decides (embeddings, hidden states)."""


def _has_labels(options: CompressOptions, model: ir.Model) -> bool:
    """Whether labels can score the model's first output: given apart, or the data's own ``labels`` array."""
    data = options.data
    if data.labels is not None:
        return True
    if data.data is None or label_problem(model):
        return False
    if isinstance(data.data, Calls):  # per-call data, read once by the run before this
        return data.data.labels is not None
    if not isinstance(data.data, (str, os.PathLike, Mapping)):
        return False
    if isinstance(data.data, Mapping):
        return "labels" in data.data
    with open_arrays(data.data) as arrays:  # lists the members, reads none
        return "labels" in arrays


def _budget(options: CompressOptions, model: ir.Model) -> Budget | None:
    """The budget to search, with its target decided when the user left it open."""
    budget, policy, data = options.budget, options.factor.policy, options.data.data
    if budget is not None and policy is not None:
        if budget.auto:
            what = "sequential refits" if budget.sequential else "search settings"
            raise InvalidInputError(f"{what} apply under a budget: give one (`max_drop`, `min_cosine`, "
                                    "`target_params` or `target_latency`) or leave out the rank `policy`")
        raise InvalidInputError("a budget chooses the ranks itself: leave out the rank `policy`")
    if budget is None and (data is None or policy is not None):
        return None
    budget = budget or Budget()
    if not budget.auto:
        return budget
    if data is None:
        what = "sequential refits" if budget.sequential else "search settings"
        raise InvalidInputError(f"{what} apply under a budget: give one (`max_drop`, `min_cosine`, "
                                "`target_params` or `target_latency`), or `data` to choose one for")
    if _has_labels(options, model):
        decided = dataclasses.replace(budget, max_drop=DEFAULT_DROP)
    elif any(kind in (DECISIONS, SCORE) for kind in output_kinds(model).values()):
        decided = dataclasses.replace(budget, max_flips=DEFAULT_FLIPS)
    else:
        decided = dataclasses.replace(budget, min_cosine=DEFAULT_COSINE)
    logger.warning(f"no rank policy given: choosing ranks for {decided.describe()} on {described(data)} (give a "
                   "`policy`, `max_drop`, ... to choose yourself)")
    return decided


def decide(options: CompressOptions, model: ir.Model) -> CompressOptions:
    """``options`` with every open choice made for ``model`` (see the module's docstring)."""
    budget = _budget(options, model)
    factor = options.factor
    real_inputs = options.data.data is not None or factor.calibration is not None
    factor = dataclasses.replace(
        factor,
        method=factor.method or ("whitened" if budget is not None and options.data.data is not None else "svd"),
        factor_heads=real_inputs if factor.factor_heads is None else factor.factor_heads)
    guard = options.guard
    if budget is not None and budget.prices_latency and guard is None:
        guard = LatencyGuard()
    return dataclasses.replace(options, factor=factor, budget=budget, guard=guard)


def settings_of(factor: FactorOptions, calibration: CalibrationSource | None = None) -> Settings:
    """The low-rank settings of decided factor options; ``calibration`` overrides theirs (a budget's fit part)."""
    assert factor.method is not None and factor.factor_heads is not None  # decided
    return Settings(factor.policy or EnergyPolicy(), factor.include, factor.exclude, factor.max_rank_fraction,
                    factor.min_params, factor.method, calibration if calibration is not None else factor.calibration,
                    factor.lp_power, factor.embedding_policy, factor.factor_heads, factor.jobs, factor.width)
