"""Global rank allocation: every layer's rank (dense included) chosen together to minimise predicted loss.

Each weight offers a few options: dense (its full cost, no loss) and the ranks q, 2q, ... (q the
multiple the kernels prefer) up to ``max_rank_fraction`` of its break-even rank m*n/(m+n), each with
its cost (parameters, bytes, or anything per shape and rank) and its predicted loss from the layer's
loss curve. Minimising the summed loss under a total cost is a multiple-choice knapsack; its
Lagrangian relaxation (for a multiplier mu each layer takes argmin loss + mu * cost) is exact on each
layer's lower convex hull of (cost, loss) points. Sweeping mu from infinity to 0 is the greedy that
takes hull steps in order of loss saved per unit of cost: :func:`allocation_path` lists every
allocation of that sweep, from cheapest to all-dense, so a search can bisect on the position along
it, with predicted loss falling and cost rising at every step. No step re-decomposes a weight.

Losses of different layers are made comparable by the caller (``scale`` in :func:`layer_options`):
the natural unit is the relative output error (loss / the layer's output energy), optionally weighted
by a measured end-to-end sensitivity of the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnx_arsvd.numerics.rank import break_even_rank

__all__ = ["DENSE", "Allocation", "LayerOptions", "allocation_path", "best_within", "frontier", "hull_options",
           "layer_options", "option_ranks", "param_cost"]

DENSE = 0
"""The rank that stands for "kept dense" in options and allocations."""

MIN_CHOICES = 16
"""A layer whose rank limit holds fewer multiples than this gets a finer grid (a power of two less)."""

Cost = Callable[[tuple[int, int], int], float]
"""Cost of a weight of shape (m, n) at a rank, ``DENSE`` for the dense weight."""


def param_cost(shape: tuple[int, int], rank: int) -> float:
    """Parameters stored: m*n dense, k*(m+n) factored."""
    return float(shape[0] * shape[1] if rank == DENSE else rank * (shape[0] + shape[1]))


@dataclass(frozen=True)
class LayerOptions:
    """One weight's choices on its lower convex hull, cheapest first: ranks (``DENSE`` last when kept),
    costs, losses; and every allowed choice, hull or not, as (cost, loss, rank) in ``choices``."""

    key: Hashable
    ranks: tuple[Any, ...]
    """The settings on the hull: ranks for low rank (a merged choice's are tuples, :mod:`.choices`)."""
    costs: tuple[float, ...]
    losses: tuple[float, ...]
    choices: tuple[tuple[float, float, Any], ...] = ()


def layer_options(
    key: Hashable,
    shape: tuple[int, int],
    losses: Sequence[float] | np.ndarray,
    *,
    scale: float = 1.0,
    multiple: int = 1,
    max_rank_fraction: float = 0.8,
    min_params: int = 0,
    cost: Cost = param_cost,
) -> LayerOptions:
    """The options of a weight whose loss at rank k is ``scale * losses[k]`` (k = 0 .. min(m, n)).

    Ranks are the multiples of ``multiple`` up to ``max_rank_fraction`` x break-even (halved, down
    to 1, until the layer has at least ``MIN_CHOICES`` of them); a weight under ``min_params``
    parameters, or with no such rank, is dense only.
    Ranks costing no less than dense (a factored layer slower than the dense one, under a latency
    cost) are not offered, and points off the lower convex hull of (cost, loss) are dropped: no
    multiplier would pick them.
    """
    ranks = [k for k in option_ranks(shape, multiple=multiple, max_rank_fraction=max_rank_fraction,
                                     min_params=min_params) if k < len(losses)]
    dense = cost(shape, DENSE)
    points = [(c, scale * float(losses[k]), k) for k in ranks if (c := cost(shape, k)) < dense]
    points.append((dense, 0.0, DENSE))
    return hull_options(key, points)


def hull_options(key: Hashable, points: Sequence[tuple[float, float, Any]]) -> LayerOptions:
    """The options of ``points`` (cost, loss, setting): all of them as choices, and their lower convex hull."""
    hull: list[tuple[float, float, Any]] = []
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if hull and point[1] >= hull[-1][1]:
            continue  # costs more, saves nothing
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], point):
            hull.pop()  # the middle point lies on or above the chord: not on the lower hull
        hull.append(point)
    costs, values, kept = zip(*hull, strict=True)
    return LayerOptions(key, tuple(kept), tuple(costs), tuple(values), tuple(points))


def option_ranks(shape: tuple[int, int], *, multiple: int = 1, max_rank_fraction: float = 0.8,
                 min_params: int = 0) -> list[int]:
    """The factored ranks a weight offers: multiples of ``multiple`` up to ``max_rank_fraction`` x break-even,
    on a finer grid (halved, down to 1) until there are at least ``MIN_CHOICES``; none under ``min_params``."""
    if multiple < 1:
        raise ValueError(f"rank multiple must be at least 1, got {multiple}")
    limit = max_rank_fraction * break_even_rank(shape)
    step = multiple
    while step > 1 and limit / step < MIN_CHOICES:  # small layers: a finer grid, so they keep a real choice
        step //= 2
    if shape[0] * shape[1] < min_params:
        return []
    return [k for k in range(step, min(shape) + 1, step) if k <= limit]


def _slope(a: tuple[float, float, Any], b: tuple[float, float, Any]) -> float:
    return (b[1] - a[1]) / (b[0] - a[0])


@dataclass(frozen=True)
class Allocation:
    """Every weight's rank (``DENSE`` for dense; a unit's setting in general), with the summed cost and predicted
    loss."""

    ranks: dict[Hashable, Any]
    cost: float
    loss: float


def allocation_path(options: Sequence[LayerOptions]) -> list[Allocation]:
    """Every allocation of the Lagrangian sweep, cheapest first (each layer at its cheapest option)
    to the last (each at its most expensive), one hull step of one layer between neighbours.

    Steps are taken in order of loss saved per unit of cost, largest first; along a lower hull the
    slopes strictly flatten, so each layer's steps come in its own order.
    """
    ranks = {o.key: o.ranks[0] for o in options}
    cost = sum(o.costs[0] for o in options)
    loss = sum(o.losses[0] for o in options)
    steps = sorted(
        ((o.losses[i + 1] - o.losses[i]) / (o.costs[i + 1] - o.costs[i]), layer, i)
        for layer, o in enumerate(options) for i in range(len(o.ranks) - 1)
    )
    path = [Allocation(dict(ranks), cost, loss)]
    for _, layer, i in steps:
        o = options[layer]
        ranks[o.key] = o.ranks[i + 1]
        cost += o.costs[i + 1] - o.costs[i]
        loss += o.losses[i + 1] - o.losses[i]
        path.append(Allocation(dict(ranks), cost, max(loss, 0.0)))
    return path


def frontier(options: Sequence[LayerOptions], cells: int = 8192) -> list[Allocation]:
    """The Pareto frontier of (cost, predicted loss) over every allowed choice, cheapest first.

    An exact multiple-choice knapsack by dynamic programming over ``cells`` cost cells, each cost
    rounded *up* to the grid (an allocation never looks cheaper than it is), merged with the
    Lagrangian :func:`allocation_path`: never worse than the path at any cost, and it closes the
    gaps between the path's points up to one cell of rounding per layer. The last point is every weight
    dense (the original), even where a cheaper point predicts no loss either.
    """
    top = sum(max(c[0] for c in o.choices) for o in options)
    unit = top / cells if top > 0 else 1.0
    exact = np.zeros(1)  # least loss of the layers so far at exactly this many (rounded) cells
    picks: list[tuple[np.ndarray, list[int]]] = []
    for o in options:
        shifts = [int(np.ceil(c[0] / unit - 1e-9)) for c in o.choices]
        table = np.full((len(o.choices), len(exact) + max(shifts)), np.inf)
        for index, ((_, loss, _), shift) in enumerate(zip(o.choices, shifts, strict=True)):
            table[index, shift:shift + len(exact)] = exact + loss
        picks.append((np.argmin(table, axis=0), shifts))
        exact = table.min(axis=0)
    allocations = []
    record = np.inf
    for cell in np.flatnonzero(np.isfinite(exact)):
        if exact[cell] < record:
            record = exact[cell]
            allocations.append(_backtrack(options, picks, int(cell)))
    pareto: list[Allocation] = []
    for a in sorted(allocations + allocation_path(options), key=lambda a: (a.cost, a.loss)):
        if not pareto or a.loss < pareto[-1].loss:
            pareto.append(a)
    dense = Allocation({o.key: DENSE for o in options},
                       sum(c for o in options for c, _, rank in o.choices if rank == DENSE), 0.0)
    if pareto[-1].ranks != dense.ranks:  # a weight at zero loss below full rank (exactly low rank, pruned)
        pareto.append(dense)  # the original ends the frontier all the same: it is what "alone" variants start from
    return pareto


def _backtrack(options: Sequence[LayerOptions], picks: list[tuple[np.ndarray, list[int]]], cell: int) -> Allocation:
    """The allocation behind the knapsack table's ``cell``, with its true (unrounded) cost and loss."""
    ranks: dict[Hashable, int] = {}
    cost = loss = 0.0
    for o, (choice, shifts) in zip(reversed(options), reversed(picks), strict=True):
        index = int(choice[cell])
        cell -= shifts[index]
        ranks[o.key] = o.choices[index][2]
        cost += o.choices[index][0]
        loss += o.choices[index][1]
    return Allocation({o.key: ranks[o.key] for o in options}, cost, loss)


def best_within(points: Sequence[Allocation], max_cost: float) -> Allocation | None:
    """The allocation of least predicted loss costing at most ``max_cost`` among ``points``
    (a :func:`frontier` or a path); None when every one costs more."""
    within = [a for a in points if a.cost <= max_cost]
    return min(within, key=lambda a: a.loss) if within else None
