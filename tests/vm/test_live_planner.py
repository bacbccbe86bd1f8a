"""The live save's pass planner: pure policy, no KVM."""

from __future__ import annotations

from squibd.vm.live import PassPlanner

MB = 1_000_000


def test_pause_when_the_remainder_fits_the_budget_at_the_measured_rate() -> None:
    planner = PassPlanner(max_passes=8, pause_budget_ms=10.0)
    planner.record(100 * MB, 0.1)  # 1 GB/s measured by pass 1
    assert planner.rate == 1e9
    assert planner.another_pass_allowed()
    assert planner.fits_pause(10 * MB)  # 10 ms at 1 GB/s
    assert not planner.fits_pause(10 * MB + 1)


def test_the_pass_limit_counts_the_final_pass() -> None:
    planner = PassPlanner(max_passes=3, pause_budget_ms=0.0)
    planner.record(MB, 0.01)
    assert planner.another_pass_allowed()  # pass 2 running, pass 3 paused
    planner.record(MB, 0.01)
    assert not planner.another_pass_allowed()
    assert planner.passes == 2


def test_two_passes_allow_no_second_precopy() -> None:
    planner = PassPlanner(max_passes=2, pause_budget_ms=10.0)
    planner.record(MB, 0.01)
    assert not planner.another_pass_allowed()


def test_an_empty_or_instant_pass_keeps_the_last_rate() -> None:
    planner = PassPlanner(max_passes=8, pause_budget_ms=10.0)
    initial = planner.rate
    planner.record(0, 0.5)
    planner.record(MB, 0.0)
    assert planner.rate == initial
    planner.record(2 * MB, 1.0)
    assert planner.rate == 2 * MB
    assert planner.fits_pause(0)
