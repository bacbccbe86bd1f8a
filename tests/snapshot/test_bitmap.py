"""DirtyBitmap: marks, KVM merges, coalesced runs, clearing only what was saved."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.snapshot.bitmap import HOST_PAGE_SIZE, DirtyBitmap, runs_from_words
from squibd.snapshot.errors import MemoryIo
from squibd.snapshot.memerrors import MemoryInputInvalid

PAGE = HOST_PAGE_SIZE


def _runs_of(pages: set[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for page in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


@settings(max_examples=60, deadline=None)
@given(
    npages=st.integers(1, 300),
    data=st.data(),
)
def test_runs_are_the_coalesced_marked_pages(npages: int, data: st.DataObject) -> None:
    bitmap = DirtyBitmap(npages * PAGE)
    expected: set[int] = set()
    for _ in range(data.draw(st.integers(0, 8))):
        first = data.draw(st.integers(0, npages - 1))
        count = data.draw(st.integers(1, npages - first))
        bitmap.mark_pages(first, count)
        expected.update(range(first, first + count))
    singles = data.draw(st.lists(st.integers(0, npages - 1), max_size=20))
    bitmap.mark_page_array(np.array(singles, dtype=np.int64))
    expected.update(singles)
    assert bitmap.snapshot_runs() == _runs_of(expected)
    assert bitmap.dirty_count() == len(expected)


@settings(max_examples=40, deadline=None)
@given(npages=st.integers(1, 200), pages=st.sets(st.integers(0, 199)))
def test_merge_kvm_uses_little_endian_bit_order(npages: int, pages: set[int]) -> None:
    pages = {p for p in pages if p < npages}
    words = np.zeros((npages + 63) // 64, dtype=np.uint64)
    raw = bytearray(words.nbytes)
    for page in pages:  # bit p%8 of byte p//8: the kernel's little-endian bitmap layout
        raw[page // 8] |= 1 << (page % 8)
    kvm_log = np.frombuffer(bytes(raw), dtype="<u8").astype(np.uint64)
    bitmap = DirtyBitmap(npages * PAGE)
    bitmap.merge_kvm(kvm_log)
    assert bitmap.snapshot_runs() == _runs_of(pages)


def test_merge_kvm_ors_with_existing_marks() -> None:
    bitmap = DirtyBitmap(128 * PAGE)
    bitmap.mark_pages(0)
    bitmap.merge_kvm(np.array([0, 1 << 63], dtype=np.uint64))
    assert bitmap.snapshot_runs() == [(0, 1), (127, 1)]


def test_merge_kvm_rejects_wrong_word_count() -> None:
    bitmap = DirtyBitmap(65 * PAGE)
    with pytest.raises(MemoryIo, match="dirty log has 1 words"):
        bitmap.merge_kvm(np.zeros(1, dtype=np.uint64))


def test_merge_kvm_ignores_bits_past_the_last_page() -> None:
    bitmap = DirtyBitmap(3 * PAGE)
    bitmap.merge_kvm(np.array([0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64))
    assert bitmap.snapshot_runs() == [(0, 3)]


def test_mark_addr_covers_every_touched_page() -> None:
    bitmap = DirtyBitmap(10 * PAGE)
    bitmap.mark_addr(PAGE - 1, 2)  # straddles pages 0 and 1
    bitmap.mark_addr(5 * PAGE, PAGE)  # exactly page 5
    assert bitmap.snapshot_runs() == [(0, 2), (5, 1)]


def test_snapshot_does_not_clear_and_clear_runs_keeps_other_pages() -> None:
    bitmap = DirtyBitmap(200 * PAGE)
    bitmap.mark_pages(10, 100)
    saved = bitmap.snapshot_runs()
    assert bitmap.snapshot_runs() == saved  # reading never clears (a failed save keeps bits)
    bitmap.clear([(10, 50)])
    assert bitmap.snapshot_runs() == [(60, 50)]
    bitmap.clear()
    assert bitmap.snapshot_runs() == []


def test_clear_words_keeps_marks_made_after_the_snapshot() -> None:
    bitmap = DirtyBitmap(64 * PAGE)
    bitmap.mark_pages(1)
    saved = bitmap.snapshot_words()
    bitmap.mark_pages(2)  # dirtied while the save ran
    bitmap.clear_words(saved)
    assert bitmap.snapshot_runs() == [(2, 1)]


@pytest.mark.parametrize("page_size", [0, 3, 4095, 6000])
def test_non_power_of_two_page_is_refused(page_size: int) -> None:
    with pytest.raises(MemoryInputInvalid, match="power of two"):
        DirtyBitmap(page_size * 4, page_size)


def test_region_not_a_page_multiple_is_refused() -> None:
    with pytest.raises(MemoryInputInvalid):
        DirtyBitmap(PAGE + 1)


@pytest.mark.parametrize("first,count", [(-1, 1), (9, 2), (0, 11)])
def test_pages_outside_the_region_are_refused(first: int, count: int) -> None:
    with pytest.raises(MemoryInputInvalid, match="outside"):
        DirtyBitmap(10 * PAGE).mark_pages(first, count)


def test_concurrent_marks_from_threads_are_all_kept() -> None:
    npages = 64 * 1024
    bitmap = DirtyBitmap(npages * PAGE)

    def mark(start: int) -> None:
        for page in range(start, npages, 4):
            bitmap.mark_pages(page)

    threads = [threading.Thread(target=mark, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert bitmap.snapshot_runs() == [(0, npages)]


def test_runs_from_words_of_empty_and_full() -> None:
    assert runs_from_words(np.zeros(4, dtype=np.uint64)) == []
    full = np.full(4, 0xFFFF_FFFF_FFFF_FFFF, dtype=np.uint64)
    assert runs_from_words(full) == [(0, 256)]


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from([0, 1, 1 << 63, 0xFFFF_FFFF_FFFF_FFFF, 0x8000_0000_0000_0001,
                                 0x5555_5555_5555_5555, 0x0F0F_0000_FFFF_00F0]) |
                st.integers(0, 0xFFFF_FFFF_FFFF_FFFF), min_size=1, max_size=12))
def test_runs_from_words_matches_bit_by_bit_reference(values: list[int]) -> None:
    words = np.array(values, dtype=np.uint64)
    pages = {w * 64 + b for w, value in enumerate(values) for b in range(64) if value >> b & 1}
    assert runs_from_words(words) == _runs_of(pages)


def test_run_table_equals_the_run_list() -> None:
    bitmap = DirtyBitmap(500 * PAGE)
    bitmap.mark_page_array(np.array([3, 4, 5, 64, 65, 130, 499]))
    table = bitmap.snapshot_run_table()
    assert table.shape == (4, 2)
    assert [tuple(row) for row in table.tolist()] == bitmap.snapshot_runs()
    assert DirtyBitmap(PAGE).snapshot_run_table().shape == (0, 2)
