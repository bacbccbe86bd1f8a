"""A VM's dirty set: the pages written since its last checkpoint (SPEC section 7).

Two sources feed it: KVM dirty-log harvests (``merge_kvm``) and squibd's own
writes into guest memory (``mark``), which KVM does not log. A save copies
the words (``words``), writes those pages, and after the commit clears
exactly the copied words (``clear``), so marks that arrive meanwhile
survive, and a failed save keeps everything for the next Diff.

During a live save a *journal* also records squibd's own writes, so that
the save's final pass rewrites pages squibd changed after an earlier pass
copied them (the dirty set alone cannot say when a page was marked).

All word arrays are per region, numpy ``uint64`` in the KVM bit order.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import numpy as np

from ..snapshot.bitmap import DirtyBitmap, Words, runs_from_words

__all__ = ["DirtySet", "Run", "or_words", "page_count", "runs_of"]

Run = tuple[int, int]


def runs_of(words: Sequence[Words] | None) -> list[list[Run]]:
    """Runs ``(first_page, npages)`` per region (empty when ``words`` is None)."""
    if words is None:
        return []
    return [runs_from_words(region_words) for region_words in words]


def or_words(a: Sequence[Words] | None, b: Sequence[Words] | None) -> list[Words] | None:
    """The per-region union of two word sets (None stands for the empty set)."""
    if a is None:
        return None if b is None else [w.copy() for w in b]
    if b is None:
        return [w.copy() for w in a]
    return [np.bitwise_or(x, y) for x, y in zip(a, b, strict=True)]


def page_count(words: Sequence[Words] | None) -> int:
    """Pages set in ``words``."""
    if words is None:
        return 0
    return int(sum(int(np.bitwise_count(w).sum()) for w in words))


@attrs.define(eq=False)
class DirtySet:
    """Dirty pages per region of one VM (see the module doc); thread-safe.

    Args:
        region_sizes: the sizes of the VM's memory regions, in order.
        tracking: whether the VM tracks dirty pages at all; without it
            only the live-save journal is kept.
    """

    region_sizes: tuple[int, ...]
    tracking: bool
    _bitmaps: list[DirtyBitmap] = attrs.field(init=False, factory=list, repr=False)
    _journal: list[DirtyBitmap] | None = attrs.field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.tracking:
            self._bitmaps = [DirtyBitmap(size) for size in self.region_sizes]

    def merge_kvm(self, region: int, words: Words) -> None:
        """OR a KVM harvest of region ``region`` into the set (no-op when not tracking)."""
        if self._bitmaps:
            self._bitmaps[region].merge_kvm(words)

    def mark(self, region: int, offset: int, length: int) -> None:
        """Mark bytes ``[offset, offset + length)`` of a region written by squibd."""
        if self._bitmaps:
            self._bitmaps[region].mark_addr(offset, length)
        journal = self._journal
        if journal is not None:
            journal[region].mark_addr(offset, length)

    def words(self) -> list[Words] | None:
        """A copy of the set's words per region (None when not tracking)."""
        if not self._bitmaps:
            return None
        return [bitmap.snapshot_words() for bitmap in self._bitmaps]

    def clear(self, saved: Sequence[Words] | None) -> None:
        """Clear exactly ``saved`` (from :meth:`words`); call only after a commit."""
        if saved is None or not self._bitmaps:
            return
        for bitmap, words in zip(self._bitmaps, saved, strict=True):
            bitmap.clear_words(words)

    def page_count(self) -> int:
        """Pages in the set (0 when not tracking)."""
        return sum(bitmap.dirty_count() for bitmap in self._bitmaps)

    def begin_journal(self) -> None:
        """Start recording squibd's own writes (a live save's final pass takes them)."""
        self._journal = [DirtyBitmap(size) for size in self.region_sizes]

    def journal_words(self) -> list[Words] | None:
        """The journal's words per region (None when no journal runs)."""
        journal = self._journal
        if journal is None:
            return None
        return [bitmap.snapshot_words() for bitmap in journal]

    def end_journal(self) -> None:
        """Stop recording squibd's own writes."""
        self._journal = None
