"""Units whose claims overlap are alternatives of one choice in the knapsack (numerics/choices.py), by hand."""

from __future__ import annotations

from onnx_arsvd.numerics.allocate import DENSE, Allocation, frontier, hull_options
from onnx_arsvd.numerics.choices import group_overlapping


def _unit(key: str, dense: float, *settings: tuple[float, float, int]):  # type: ignore[no-untyped-def]
    return hull_options(key, [*settings, (dense, 0.0, DENSE)])


# an FFN of two weights (w1: 100 parameters, w2: 100): low rank on each, and a width unit that claims both
LOW_1 = _unit("low1", 100.0, (40.0, 0.30, 8), (60.0, 0.10, 16))
LOW_2 = _unit("low2", 100.0, (50.0, 0.20, 8))
WIDTH = _unit("width", 200.0, (100.0, 0.25, 64), (150.0, 0.05, 96))
OTHER = _unit("other", 10.0, (5.0, 0.5, 1))
CLAIMS = {"low1": frozenset({"w1"}), "low2": frozenset({"w2"}), "width": frozenset({"w1", "w2"}),
          "other": frozenset({"w3"})}
DENSE_COST = {"w1": 100.0, "w2": 100.0, "w3": 10.0}


def test_units_that_share_no_weight_are_their_own_choices_unchanged() -> None:
    grouping = group_overlapping([LOW_1, LOW_2, OTHER], CLAIMS, DENSE_COST)
    assert grouping.options == (LOW_1, LOW_2, OTHER) and grouping.members == {}
    point = Allocation({"low1": 8, "low2": DENSE, "other": 1}, 145.0, 0.8)
    assert grouping.expand(point) == point


def test_overlapping_units_become_one_choice_of_disjoint_alternatives_on_the_pareto_front() -> None:
    grouping = group_overlapping([LOW_1, WIDTH, LOW_2, OTHER], CLAIMS, DENSE_COST)
    merged, other = grouping.options
    assert other == OTHER and grouping.members[merged.key] == ("low1", "width", "low2")
    by_setting = {c[2]: (c[0], c[1]) for c in merged.choices}
    assert by_setting[DENSE] == (200.0, 0.0)
    assert by_setting[(("width", 64),)] == (100.0, 0.25)
    assert by_setting[(("width", 96),)] == (150.0, 0.05)
    assert by_setting[(("low1", 8), ("low2", 8))] == (90.0, 0.50)  # both low rank: disjoint claims
    assert not any(("width" in dict(s) and len(s) > 1) for s in by_setting if s != DENSE)  # never width + low rank
    assert (("low1", 8),) not in by_setting  # 140 (w2 dense beside it) for 0.30: width 64 is cheaper and better
    assert (("low1", 16),) not in by_setting  # 160 for 0.10 is beaten by width 96 (150 for 0.05): off the front


def test_an_allocation_over_a_merged_choice_gives_every_unit_its_setting() -> None:
    grouping = group_overlapping([LOW_1, WIDTH, LOW_2, OTHER], CLAIMS, DENSE_COST)
    points = [grouping.expand(point) for point in frontier(grouping.options)]
    assert points[-1].ranks == {"low1": DENSE, "width": DENSE, "low2": DENSE, "other": DENSE}
    assert all(set(p.ranks) == {"low1", "width", "low2", "other"} for p in points)
    for point in points:  # no point changes a weight twice
        active = [unit for unit in ("low1", "width", "low2") if point.ranks[unit] != DENSE]
        assert "width" not in active or active == ["width"]
    cheapest = points[0]
    assert cheapest.ranks == {"low1": 8, "width": DENSE, "low2": 8, "other": 1} and cheapest.cost == 95.0
