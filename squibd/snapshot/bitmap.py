"""The dirty bitmap of one guest memory region (SPEC sections 5 and 7).

One bit per host page, kept in numpy ``uint64`` words in the KVM dirty-log
bit order: page ``p`` is bit ``p % 64`` of word ``p // 64`` (little-endian
bit order within a 64-bit word, as ``KVM_GET_DIRTY_LOG`` returns it).

Marks come from several threads (vCPU-side device emulation, dirty-log
harvests, fault handlers); every operation takes the bitmap's lock. A save
reads the dirty set with :meth:`DirtyBitmap.snapshot_runs` (or
:meth:`DirtyBitmap.snapshot_words`), which does not clear; only after the
snapshot pair is committed does the caller :meth:`DirtyBitmap.clear` what it
saved, so a failed save keeps every bit for the next Diff.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

from .memerrors import MemoryInputInvalid

__all__ = [
    "HOST_PAGE_SIZE",
    "WORD_BITS",
    "DirtyBitmap",
    "Words",
    "run_arrays_from_words",
    "runs_from_words",
]

#: SPEC section 1: the host page, read from the system, never assumed.
HOST_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
#: Bits per bitmap word (KVM dirty logs are arrays of 64-bit longs on 64-bit hosts).
WORD_BITS: Final = 64
_ALL_ONES_INT: Final = (1 << WORD_BITS) - 1
_ALL_ONES: Final = np.uint64(_ALL_ONES_INT)

Words = npt.NDArray[np.uint64]
Run = tuple[int, int]


def _words_for(npages: int) -> int:
    return (npages + WORD_BITS - 1) // WORD_BITS


def _set_range(words: Words, first: int, end: int) -> None:
    """Set bits ``[first, end)`` of ``words`` (no locking, no checks)."""
    if first >= end:
        return
    w0, b0 = divmod(first, WORD_BITS)
    w1, b1 = divmod(end, WORD_BITS)
    if w0 == w1:
        words[w0] |= np.uint64(((1 << (b1 - b0)) - 1) << b0)
        return
    words[w0] |= np.uint64((_ALL_ONES_INT << b0) & _ALL_ONES_INT)
    words[w0 + 1 : w1] = _ALL_ONES
    if b1:
        words[w1] |= np.uint64((1 << b1) - 1)


def _bit_positions(words: Words) -> npt.NDArray[np.int64]:
    """Indices of the set bits of ``words`` (bit ``i`` of word ``w`` is ``64 * w + i``), sorted.

    Peels the lowest set bit of every non-zero word per round (``x & -x``; its
    index is exact through ``frexp`` because powers of two are exact doubles),
    so the cost follows the bits set in the busiest word, not the word width.
    """
    nonzero = np.flatnonzero(words)
    values = words[nonzero]
    bases = nonzero * WORD_BITS
    found: list[npt.NDArray[np.int64]] = []
    while values.size:
        lowest = values & (~values + np.uint64(1))
        _, exponent = np.frexp(lowest.astype(np.float64))
        found.append(bases + exponent.astype(np.int64) - 1)
        values = values ^ lowest
        keep = values != 0
        values, bases = values[keep], bases[keep]
    if not found:
        return np.zeros(0, dtype=np.int64)
    positions: npt.NDArray[np.int64] = np.sort(np.concatenate(found))
    return positions


def run_arrays_from_words(words: Words) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Coalesced runs of the set bits of ``words`` as two arrays: first pages, page counts.

    Works on run boundaries only: a run starts at a set bit whose predecessor
    is clear and ends at a set bit whose successor is clear (carrying across
    words), so the cost follows the number of runs, not of dirty pages.
    """
    if words.size == 0 or not words.any():
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    previous_high = np.zeros_like(words)
    previous_high[1:] = words[:-1] >> np.uint64(WORD_BITS - 1)
    next_low = np.zeros_like(words)
    next_low[:-1] = (words[1:] & np.uint64(1)) << np.uint64(WORD_BITS - 1)
    starts = _bit_positions(words & ~((words << np.uint64(1)) | previous_high))
    lasts = _bit_positions(words & ~((words >> np.uint64(1)) | next_low))
    return starts, lasts - starts + 1


def runs_from_words(words: Words) -> list[Run]:
    """Coalesced runs ``(first_page, npages)`` of the set bits of ``words``, ascending."""
    starts, counts = run_arrays_from_words(words)
    return list(zip(starts.tolist(), counts.tolist(), strict=True))


@attrs.define(eq=False)
class DirtyBitmap:
    """Page-granular dirty bits for one region; thread-safe (see the module doc).

    Args:
        region_size: the region's size in bytes (a multiple of ``page_size``).
        page_size: the tracking page, a power of two (default: the host page).

    Raises:
        MemoryInputInvalid: the page size is not a power of two or does not divide the region.
    """

    region_size: int
    page_size: int = HOST_PAGE_SIZE
    npages: int = attrs.field(init=False)
    _words: Words = attrs.field(init=False, repr=False)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.page_size <= 0 or self.page_size & (self.page_size - 1):
            raise MemoryInputInvalid(f"page size {self.page_size} is not a power of two")
        if self.region_size <= 0 or self.region_size % self.page_size:
            raise MemoryInputInvalid(
                f"region size {self.region_size} is not a positive multiple of the "
                f"{self.page_size}-byte page"
            )
        self.npages = self.region_size // self.page_size
        self._words = np.zeros(_words_for(self.npages), dtype=np.uint64)

    @property
    def word_count(self) -> int:
        """Number of 64-bit words (what a KVM dirty log of this region holds)."""
        return int(self._words.size)

    def _check_pages(self, first: int, count: int) -> None:
        if first < 0 or count < 0 or first + count > self.npages:
            raise MemoryInputInvalid(
                f"pages [{first}, {first + count}) lie outside the region's {self.npages} pages"
            )

    def mark_pages(self, first: int, count: int = 1) -> None:
        """Mark ``count`` pages dirty starting at page index ``first``."""
        self._check_pages(first, count)
        with self._lock:
            _set_range(self._words, first, first + count)

    def mark_addr(self, offset: int, length: int) -> None:
        """Mark every page touched by bytes ``[offset, offset + length)`` of the region."""
        if offset < 0 or length < 0 or offset + length > self.region_size:
            raise MemoryInputInvalid(
                f"bytes [{offset}, {offset + length}) lie outside the region's "
                f"{self.region_size} bytes"
            )
        if length == 0:
            return
        first = offset // self.page_size
        end = (offset + length + self.page_size - 1) // self.page_size
        with self._lock:
            _set_range(self._words, first, end)

    def mark_page_array(self, pages: npt.ArrayLike) -> None:
        """Mark many single pages at once (an array of page indices)."""
        indices = np.asarray(pages, dtype=np.int64)
        if indices.size == 0:
            return
        if int(indices.min()) < 0 or int(indices.max()) >= self.npages:
            raise MemoryInputInvalid(f"page indices outside the region's {self.npages} pages")
        bits = np.left_shift(np.uint64(1), (indices % WORD_BITS).astype(np.uint64))
        with self._lock:
            np.bitwise_or.at(self._words, indices // WORD_BITS, bits)

    def merge_kvm(self, words: npt.NDArray[np.uint64]) -> None:
        """OR a KVM per-slot dirty log (``uint64`` words, little-endian bit order) into the set.

        Raises:
            MemoryInputInvalid: the log's word count differs from this region's.
        """
        incoming = np.asarray(words)
        if incoming.ndim != 1 or incoming.size != self._words.size:
            raise MemoryInputInvalid(
                f"dirty log has {incoming.size} words, the region of {self.npages} pages "
                f"needs {self._words.size}"
            )
        incoming = incoming.astype("<u8", copy=False).view(np.uint64)
        with self._lock:
            np.bitwise_or(self._words, incoming, out=self._words)
            tail = self.npages % WORD_BITS
            if tail:  # bits past the last page are not pages: never keep them
                self._words[-1] &= np.uint64((1 << tail) - 1)

    def snapshot_words(self) -> Words:
        """A copy of the words (for :meth:`clear_words` after a commit)."""
        with self._lock:
            return self._words.copy()

    def snapshot_runs(self) -> list[Run]:
        """The dirty set as coalesced runs ``(first_page, npages)``; does not clear."""
        return runs_from_words(self.snapshot_words())

    def snapshot_run_table(self) -> npt.NDArray[np.int64]:
        """The dirty runs as an ``(n, 2)`` array of ``(first_page, npages)``; does not clear.

        ``write_memory`` accepts this table as a region's runs without converting
        thousands of tuples (the fast path for large Diffs).
        """
        starts, counts = run_arrays_from_words(self.snapshot_words())
        return np.column_stack((starts, counts))

    def dirty_count(self) -> int:
        """Number of dirty pages."""
        with self._lock:
            return int(np.bitwise_count(self._words).sum())

    def is_dirty(self, page: int) -> bool:
        """Whether page ``page`` is marked."""
        self._check_pages(page, 1)
        word, bit = divmod(page, WORD_BITS)
        with self._lock:
            return bool((int(self._words[word]) >> bit) & 1)

    def clear(self, runs: Iterable[Run] | None = None) -> None:
        """Clear the given runs, or every bit when ``runs`` is None. Call only after a commit."""
        with self._lock:
            if runs is None:
                self._words[:] = 0
                return
            mask = np.zeros_like(self._words)
            for first, count in runs:
                self._check_pages(first, count)
                _set_range(mask, first, first + count)
            np.bitwise_and(self._words, ~mask, out=self._words)

    def clear_words(self, saved: Words) -> None:
        """Clear exactly the bits of ``saved`` (from :meth:`snapshot_words`); keep later marks."""
        if saved.shape != self._words.shape:
            raise MemoryInputInvalid(
                f"saved bitmap has {saved.size} words, the region needs {self._words.size}"
            )
        with self._lock:
            np.bitwise_and(self._words, ~saved, out=self._words)
