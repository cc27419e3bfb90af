"""Disclosure-control rules (ACRO's defaults) as pure functions."""

from __future__ import annotations

from spe.airlock import sdc


def test_threshold_and_zeros() -> None:
    assert sdc.below_threshold(1) and sdc.below_threshold(9)
    assert not sdc.below_threshold(10) and not sdc.below_threshold(0)
    assert sdc.is_zero(0) and not sdc.is_zero(1)
    assert sdc.small_cells([0, 3, 10, 250, 9, 0]) == (2, 2)
    assert sdc.small_cells([12, 15], threshold=20) == (2, 0)


def test_dominance_n2_k90() -> None:
    # ACRO's example: two contributors hold 95 of 100 -> dominated.
    assert sdc.dominated([60, 35, 2, 2, 1])
    assert not sdc.dominated([30, 30, 20, 20])
    assert sdc.dominated([91, 0, 0])
    assert not sdc.dominated([])
    assert not sdc.dominated([45, 45, 10])  # exactly 90 %: not more than k


def test_p_ratio_ten_percent() -> None:
    # The rest (total minus the two largest) must be at least 10 % of the largest.
    assert sdc.p_ratio_fails([100, 50, 5])       # 5 < 10
    assert not sdc.p_ratio_fails([100, 50, 10])  # 10 is not < 10
    assert sdc.p_ratio_fails([100])              # a single contributor
    assert not sdc.p_ratio_fails([0, 0])


def test_residual_degrees_of_freedom() -> None:
    assert sdc.residual_dof_too_small(15, 6)
    assert not sdc.residual_dof_too_small(16, 6)


def test_differencing_by_one_person() -> None:
    released = {("F",): {"n": 120.0}, ("M",): {"n": 130.0}}
    new = {("F",): {"n": 121.0}, ("M",): {"n": 130.0}}
    found = sdc.differences(new, released)
    assert {(d.key, d.delta) for d in found} == {(("F",), 1.0), (("<total>",), 1.0)}
    assert sdc.differences(released, released) == []
    far = {("F",): {"n": 150.0}, ("M",): {"n": 160.0}}
    assert sdc.differences(far, released) == []


def test_differencing_by_margin_only() -> None:
    # Different groupings but the totals differ by 3: the margin reveals a small group.
    released = {("a",): {"n": 50.0}, ("b",): {"n": 50.0}}
    new = {("x",): {"n": 53.0}, ("y",): {"n": 50.0}}
    found = sdc.differences(new, released)
    assert [(d.key, d.delta) for d in found] == [(("<total>",), 3.0)]
