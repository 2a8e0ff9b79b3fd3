"""Measured latency as the global allocation's cost, from the latency guard's per-shape table.

Each weight's layers are timed as one-node models (:meth:`onnx_arsvd.measure.guard.LatencyTable.timings`),
dense and factored at a grid of ranks, on the guard's provider, at each of its batch sizes, with
the rows per call each layer really sees. Each timing pairs dense and factored runs interleaved,
so their ratio is what a timing measures best (a machine that speeds up or slows down during the
table moves both). The ratios are made non-decreasing in the rank by isotonic regression (noise
must not make a larger rank look cheaper, and one slow timing must not lift every larger rank) and
interpolated linearly between the grid's ranks: at a fixed shape a MatMul pair's time grows about
linearly with the rank.

Batch sizes weigh equally: a layer's cost is the sum over batch sizes of its milliseconds divided
by all the priced layers' dense milliseconds at that batch size. The all-dense allocation then
costs the number of batch sizes, and a point's cost divided by that is its predicted share of the
dense layers' latency; the rest of the graph (attention, norms, activations) is not in it, which is
why the whole-model check still times the result. A rank whose cost is not below dense by the
guard's margin is priced at infinity, so the allocation never offers it. A rank that saves in sum
but not at every batch size can be offered: at batch 1 a small layer's two MatMuls cost about what
its one did (a fixed per-operator time), while at batch 32 they are much faster; the guard, which
runs after the search, then decides by its own per-batch rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression

from onnx_arsvd.graph.layers import WeightKey
from onnx_arsvd.measure.guard import LatencyTable
from onnx_arsvd.methods.lowrank.curves import WeightCurve
from onnx_arsvd.numerics.allocate import DENSE, Cost, option_ranks
from onnx_arsvd.progress import progress_bar

__all__ = ["LatencyCosts", "latency_costs", "rank_grid"]


def rank_grid(ranks: Sequence[int]) -> list[int]:
    """The ranks timed among a weight's ``ranks`` (ascending): the smallest, doubling from it, and the largest."""
    if not ranks:
        return []
    grid = [ranks[0]]
    while grid[-1] * 2 < ranks[-1]:
        grid.append(grid[-1] * 2)
    return grid + [ranks[-1]] if grid[-1] != ranks[-1] else grid


@dataclass(frozen=True)
class _Priced:
    """One weight's summed dense milliseconds per batch size, and its factored / dense ratios at the grid's ranks."""

    dense: np.ndarray
    grid: list[int]
    ratios: np.ndarray
    """Grid ranks x batch sizes, non-decreasing down each column."""


@dataclass(frozen=True)
class LatencyCosts:
    """Each weight's cost function, and what the report says of how they were measured."""

    costs: dict[WeightKey, Cost]
    """Every weight's: a weight offering no rank, or not timed alone, costs nothing and stays dense."""
    description: str
    unpriced: list[WeightKey]
    """Weights used in a form the guard cannot time alone (W @ X, transposed inputs): kept dense."""


def latency_costs(
    curves: Sequence[WeightCurve],
    table: LatencyTable,
    provider: str,
    rows: Mapping[int, float],
    dims: Mapping[str, int],
    *,
    multiple: int,
    max_rank_fraction: float,
    min_params: int,
    progress: bool = False,
) -> LatencyCosts:
    """The measured-latency cost of every weight at every rank the allocation may offer it.

    ``rows`` are the activation rows per sample of each layer (:func:`onnx_arsvd.measure.guard.observed_rows`;
    ``dims`` size the graph's symbolic dimensions for a layer without);
    ``multiple``, ``max_rank_fraction`` and ``min_params`` are the allocation's, so the grid spans
    exactly the ranks it offers.
    """
    guard = table.guard
    priced: dict[WeightKey, _Priced] = {}
    unpriced = []
    offered = {c.key: option_ranks(c.curve.shape, multiple=multiple, max_rank_fraction=max_rank_fraction,
                                   min_params=min_params) for c in curves}
    timed = [c for c in curves if offered[c.key]]
    total = sum(len(rank_grid(offered[c.key])) * len(c.layers) for c in timed)
    with progress_bar(total=total, desc="latency table", unit="timing", progress=progress) as bar:
        for c in timed:
            if not all(layer.is_plain for layer in c.layers):
                unpriced.append(c.key)
                continue
            grid = rank_grid(offered[c.key])
            dense = np.zeros(len(guard.batches))
            factored = np.zeros((len(grid), len(guard.batches)))
            for layer in c.layers:
                runs = []
                for rank in grid:
                    runs.append([(t.dense_ms, t.factored_ms) for t in table.timings(layer, rank, provider, dims,
                                                                                     rows.get(id(layer.node)))])
                    bar.update()
                times = np.array(runs)  # grid ranks x batch sizes x (dense, factored)
                layer_dense = np.median(times[..., 0], axis=0)  # every timing measured the dense layer too
                dense += layer_dense
                factored += times[..., 1] / times[..., 0] * layer_dense
            ratios = np.column_stack([isotonic_regression(column / dense_ms).x
                                      for column, dense_ms in zip(factored.T, dense, strict=True)])
            priced[c.key] = _Priced(dense, grid, ratios)
    scale = sum((p.dense for p in priced.values()), np.zeros(len(guard.batches)))
    costs: dict[WeightKey, Cost] = {c.key: _cost(priced[c.key], scale, guard.margin) if c.key in priced
                                    else _dense_only for c in curves}
    where = provider.removesuffix("ExecutionProvider")
    batches = ", ".join(str(b) for b in guard.batches)
    description = (f"measured latency on {where} at batch {batches} ({len(table)} timings in the table; "
                   f"{len(priced)} weights priced" + (f", {len(unpriced)} not timed alone, kept dense" if unpriced
                                                       else "") + ")")
    return LatencyCosts(costs, description, unpriced)


def _cost(priced: _Priced, scale: np.ndarray, margin: float) -> Cost:
    """The cost function of one priced weight: dense as measured, factored from the ratios interpolated
    on the grid; infinite where that does not save the guard's ``margin`` of the dense cost."""
    dense = priced.dense / np.where(scale > 0, scale, 1.0)

    def cost(shape: tuple[int, int], rank: int) -> float:
        if rank == DENSE:
            return float(dense.sum())
        factored = float(sum(np.interp(rank, priced.grid, column) * share
                             for column, share in zip(priced.ratios.T, dense, strict=True)))
        return factored if factored < (1.0 - margin) * dense.sum() else float("inf")

    return cost


def _dense_only(shape: tuple[int, int], rank: int) -> float:
    """A weight outside the latency table: constant in every allocation, so it adds nothing to compare."""
    return 0.0 if rank == DENSE else float("inf")
