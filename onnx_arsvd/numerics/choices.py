"""Units whose claims overlap become alternatives of one choice in the knapsack.

A compression method offers settings per *unit* (low rank: one weight; width reduction: an FFN's two weights),
and a unit claims the weights it changes. Two units that claim a common weight cannot both change it, so the
allocation must not pick both: every group of units linked by shared claims becomes one choice whose
alternatives are the settings of pairwise-disjoint members together (each other member dense), pruned to the
(cost, loss) Pareto front. A unit that shares no weight is its own choice, unchanged. After the knapsack,
:meth:`Grouping.expand` gives every unit its setting back.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from onnx_arsvd.numerics.allocate import DENSE, Allocation, LayerOptions, hull_options

__all__ = ["Grouping", "group_overlapping"]


@dataclass(frozen=True)
class Grouping:
    """The knapsack's choices (``options``) and, for each merged choice, the units it stands for."""

    options: tuple[LayerOptions, ...]
    members: Mapping[Hashable, tuple[Hashable, ...]]

    def expand(self, allocation: Allocation) -> Allocation:
        """``allocation`` over the choices as every unit's setting (``DENSE`` for a unit not picked)."""
        settings: dict[Hashable, Any] = {}
        for key, setting in allocation.ranks.items():
            if key not in self.members:
                settings[key] = setting
                continue
            picked = dict(setting) if setting != DENSE else {}
            settings.update({unit: picked.get(unit, DENSE) for unit in self.members[key]})
        return Allocation(settings, allocation.cost, allocation.loss)


def _components(claims: Mapping[Hashable, frozenset[Hashable]]) -> list[list[Hashable]]:
    """The units linked by shared claims, in their given order."""
    parent = {unit: unit for unit in claims}

    def root(unit: Hashable) -> Hashable:
        while parent[unit] != unit:
            parent[unit] = parent[parent[unit]]
            unit = parent[unit]
        return unit

    owner: dict[Hashable, Hashable] = {}
    for unit, weights in claims.items():
        for weight in weights:
            if weight in owner:
                parent[root(unit)] = root(owner[weight])
            else:
                owner[weight] = unit
    groups: dict[Hashable, list[Hashable]] = {}
    for unit in claims:
        groups.setdefault(root(unit), []).append(unit)
    return list(groups.values())


def _merged(units: list[Hashable], options: Mapping[Hashable, LayerOptions],
            claims: Mapping[Hashable, frozenset[Hashable]], dense_cost: Mapping[Hashable, float]) -> LayerOptions:
    """One choice for a group of overlapping units: every set of disjoint members at their settings, the rest
    dense, on the (cost, loss) Pareto front."""
    weights = frozenset().union(*(claims[u] for u in units))
    points: list[tuple[float, float, Any]] = [(sum(dense_cost[w] for w in weights), 0.0, DENSE)]
    for size in range(1, len(units) + 1):
        for subset in itertools.combinations(units, size):
            if sum(len(claims[u]) for u in subset) != len(frozenset().union(*(claims[u] for u in subset))):
                continue  # two members claim one weight
            rest = sum(dense_cost[w] for w in weights - frozenset().union(*(claims[u] for u in subset)))
            active = [[c for c in options[u].choices if c[2] != DENSE] for u in subset]
            for picks in itertools.product(*active):
                points.append((rest + sum(c[0] for c in picks), sum(c[1] for c in picks),
                               tuple((u, c[2]) for u, c in zip(subset, picks, strict=True))))
    front: list[tuple[float, float, Any]] = []
    for point in sorted(points, key=lambda p: (p[0], p[1])):
        if not front or point[1] < front[-1][1] or point[2] == DENSE:
            front.append(point)
    return hull_options(("group", *units), front)


def group_overlapping(options: Sequence[LayerOptions], claims: Mapping[Hashable, frozenset[Hashable]],
                      dense_cost: Mapping[Hashable, float]) -> Grouping:
    """The knapsack's choices for ``options`` (one per unit, keyed like ``claims``); ``dense_cost`` is each
    claimed weight's cost when left dense."""
    by_key = {o.key: o for o in options}
    merged: list[LayerOptions] = []
    members: dict[Hashable, tuple[Hashable, ...]] = {}
    for units in _components({o.key: claims[o.key] for o in options}):
        if len(units) == 1:
            merged.append(by_key[units[0]])
            continue
        choice = _merged(units, by_key, claims, dense_cost)
        merged.append(choice)
        members[choice.key] = tuple(units)
    return Grouping(tuple(merged), members)
