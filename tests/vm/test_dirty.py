"""The VM dirty set: marks, KVM merges, exact clears after a commit, the live journal."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.vm.dirty import DirtySet, or_words, page_count, runs_of

PAGE = os.sysconf("SC_PAGE_SIZE")
REGION_PAGES = (300, 70)  # two regions, neither a multiple of 64 pages
SIZES = tuple(n * PAGE for n in REGION_PAGES)

_region = st.integers(0, len(REGION_PAGES) - 1)
_write = _region.flatmap(
    lambda r: st.tuples(
        st.just(r),
        st.integers(0, SIZES[r] - 1).flatmap(
            lambda off: st.tuples(st.just(off), st.integers(1, min(3 * PAGE, SIZES[r] - off)))
        ),
    )
)


def _pages_of(writes: list[tuple[int, tuple[int, int]]]) -> set[tuple[int, int]]:
    pages = set()
    for region, (offset, length) in writes:
        pages.update((region, p) for p in range(offset // PAGE, (offset + length - 1) // PAGE + 1))
    return pages


def _set_of(words: list[np.ndarray] | None) -> set[tuple[int, int]]:
    out = set()
    for region, runs in enumerate(runs_of(words)):
        for first, count in runs:
            out.update((region, p) for p in range(first, first + count))
    return out


@settings(max_examples=60, deadline=None)
@given(before=st.lists(_write, max_size=12), after=st.lists(_write, max_size=12))
def test_clear_after_commit_keeps_only_later_marks(
    before: list[tuple[int, tuple[int, int]]], after: list[tuple[int, tuple[int, int]]]
) -> None:
    dirty = DirtySet(SIZES, True)
    for region, (offset, length) in before:
        dirty.mark(region, offset, length)
    saved = dirty.words()
    assert _set_of(saved) == _pages_of(before)
    assert page_count(saved) == len(_pages_of(before)) == dirty.page_count()
    for region, (offset, length) in after:  # marks that arrive while the save runs
        dirty.mark(region, offset, length)
    dirty.clear(saved)  # the commit succeeded
    assert _set_of(dirty.words()) == _pages_of(after) - _pages_of(before)


@settings(max_examples=40, deadline=None)
@given(pages=st.sets(st.integers(0, REGION_PAGES[0] - 1), max_size=40))
def test_kvm_merge_and_union(pages: set[int]) -> None:
    words = np.zeros((REGION_PAGES[0] + 63) // 64, dtype=np.uint64)
    for page in pages:
        words[page // 64] |= np.uint64(1 << (page % 64))
    dirty = DirtySet(SIZES, True)
    dirty.merge_kvm(0, words)
    got = _set_of(dirty.words())
    assert got == {(0, p) for p in pages}
    union = or_words(dirty.words(), [np.zeros_like(w) for w in dirty.words() or []])
    assert _set_of(union) == got
    assert or_words(None, None) is None


def test_untracked_set_keeps_only_the_live_journal() -> None:
    dirty = DirtySet(SIZES, False)
    dirty.mark(0, 0, 1)
    assert dirty.words() is None and dirty.page_count() == 0
    assert dirty.journal_words() is None
    dirty.begin_journal()
    dirty.mark(1, PAGE, 1)
    assert _set_of(dirty.journal_words()) == {(1, 1)}
    dirty.end_journal()
    assert dirty.journal_words() is None
