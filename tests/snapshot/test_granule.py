"""Adaptive granule (SPEC section 7): per-block threshold, fold keeps coverage, one-way."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.snapshot.bitmap import HOST_PAGE_SIZE
from squibd.snapshot.granule import AdaptiveGranule, GranuleConfig
from squibd.snapshot.memerrors import MemoryInputInvalid

PAGE = HOST_PAGE_SIZE
BLOCK = 2 * 1024 * 1024
PAGES_PER_BLOCK = BLOCK // PAGE


class FakeClock:
    """A manual monotonic clock: tests advance it, nothing sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _granule(blocks: int = 8, **config: float) -> tuple[AdaptiveGranule, FakeClock]:
    clock = FakeClock()
    return AdaptiveGranule(blocks * BLOCK, GranuleConfig(**config), clock=clock), clock  # type: ignore[arg-type]


def test_starts_coarse_and_marks_whole_blocks() -> None:
    granule, _ = _granule()
    assert granule.record_fault(BLOCK + 5 * PAGE) == (BLOCK, BLOCK)
    assert not granule.fine_mode
    assert granule.dirty_runs() == [(PAGES_PER_BLOCK, PAGES_PER_BLOCK)]


def test_steps_down_when_one_block_exceeds_threshold_in_window() -> None:
    granule, clock = _granule()
    for i in range(32):  # 32 faults: not more than 32
        granule.record_fault(i * PAGE)
        clock.now += 0.001
    assert not granule.fine_mode
    assert granule.record_fault(40 * PAGE) == (40 * PAGE, PAGE)  # the 33rd
    assert granule.fine_mode
    assert granule.granule == PAGE


def test_threshold_is_per_block_not_aggregate() -> None:
    granule, clock = _granule(blocks=8)
    for i in range(8 * 32):  # 256 faults in total, 32 per block, all in one window
        granule.record_fault((i % 8) * BLOCK + (i // 8) * PAGE)
    clock.now += 0.05
    assert not granule.fine_mode
    assert granule.dirty_runs() == [(0, 8 * PAGES_PER_BLOCK)]


def test_faults_spread_beyond_the_window_do_not_step_down() -> None:
    granule, clock = _granule()
    for i in range(200):
        granule.record_fault(i % PAGES_PER_BLOCK * PAGE)
        clock.now += 0.01  # 10 faults per 100 ms
    assert not granule.fine_mode


def test_step_down_folds_coarse_blocks_as_fully_dirty() -> None:
    granule, _ = _granule(blocks=4)
    granule.record_fault(3 * BLOCK + PAGE)  # block 3 dirty while coarse
    for _ in range(33):
        granule.record_fault(0)  # block 0 goes hot
    assert granule.fine_mode
    runs = granule.dirty_runs()
    assert (3 * PAGES_PER_BLOCK, PAGES_PER_BLOCK) in runs  # fold kept coverage
    assert runs[0] == (0, PAGES_PER_BLOCK)
    granule.record_fault(2 * BLOCK + 7 * PAGE)
    assert (2 * PAGES_PER_BLOCK + 7, 1) in granule.dirty_runs()


def test_step_down_is_one_way_until_checkpoint() -> None:
    granule, clock = _granule()
    for _ in range(33):
        granule.record_fault(0)
    clock.now += 100.0
    granule.record_fault(BLOCK)
    assert granule.fine_mode
    granule.reset_after_checkpoint()
    assert not granule.fine_mode
    assert granule.dirty_runs() == []
    assert granule.record_fault(BLOCK) == (BLOCK, BLOCK)


def test_thresholds_are_configurable() -> None:
    granule, _ = _granule(fault_threshold=2, window_s=1.0)
    granule.record_fault(0)
    granule.record_fault(0)
    assert not granule.fine_mode
    granule.record_fault(0)
    assert granule.fine_mode


def test_last_partial_block_is_clipped_to_the_region() -> None:
    clock = FakeClock()
    granule = AdaptiveGranule(BLOCK + 3 * PAGE, clock=clock)
    assert granule.record_fault(BLOCK + PAGE) == (BLOCK, 3 * PAGE)
    assert granule.dirty_runs() == [(PAGES_PER_BLOCK, 3)]


def test_bad_config_and_faults_are_refused() -> None:
    with pytest.raises(MemoryInputInvalid):
        GranuleConfig(coarse_size=3 * 1024 * 1024)
    granule, _ = _granule(blocks=1)
    with pytest.raises(MemoryInputInvalid):
        granule.record_fault(BLOCK)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4 * PAGES_PER_BLOCK - 1), st.floats(0, 0.05)),
                max_size=120))
def test_every_faulted_page_is_covered(faults: list[tuple[int, float]]) -> None:
    granule, clock = _granule(blocks=4)
    for page, step in faults:
        clock.now += step
        granule.record_fault(page * PAGE)
    covered = {p for first, n in granule.dirty_runs() for p in range(first, first + n)}
    assert {page for page, _ in faults} <= covered
