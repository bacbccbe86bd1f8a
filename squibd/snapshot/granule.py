"""Adaptive tracking granule for fault-based dirty sources (SPEC section 7).

Theory of operation
-------------------
A fault-based source (userfaultfd write-protect, or faults an attached VMM
reports) pays per fault. :class:`AdaptiveGranule` tracks one region:

- it starts **coarse**: a fault marks the whole block (2 MiB by default)
  dirty in a coarse bitmap, and the caller may unprotect the whole block,
  so a busy block costs one fault, not one per page;
- every fault is also counted per block in a sliding window; when one block
  sees more than ``fault_threshold`` faults (32) within ``window_s``
  (100 ms), the region **steps down** to the host page: the coarse dirty
  blocks fold into the fine :class:`DirtyBitmap` as fully dirty (coverage
  is kept) and every later fault marks one page. The threshold is per
  block, never the region's aggregate;
- step-down is one-way until :meth:`AdaptiveGranule.reset_after_checkpoint`.

The clock is injectable so tests drive the window deterministically.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Final

import attrs
import numpy as np

from .bitmap import HOST_PAGE_SIZE, DirtyBitmap, Run
from .memerrors import MemoryInputInvalid

__all__ = [
    "DEFAULT_COARSE_SIZE",
    "DEFAULT_FAULT_THRESHOLD",
    "DEFAULT_WINDOW_S",
    "AdaptiveGranule",
    "GranuleConfig",
]

#: SPEC section 7 defaults: 2 MiB coarse blocks, more than 32 faults in 100 ms.
DEFAULT_COARSE_SIZE: Final = 2 * 1024 * 1024
DEFAULT_FAULT_THRESHOLD: Final = 32
DEFAULT_WINDOW_S: Final = 0.100


@attrs.frozen
class GranuleConfig:
    """Thresholds of the adaptive granule (SPEC section 7, configurable)."""

    coarse_size: int = DEFAULT_COARSE_SIZE
    fault_threshold: int = DEFAULT_FAULT_THRESHOLD
    window_s: float = DEFAULT_WINDOW_S

    def __attrs_post_init__(self) -> None:
        if self.coarse_size <= 0 or self.coarse_size & (self.coarse_size - 1):
            raise MemoryInputInvalid(f"coarse granule {self.coarse_size} is not a power of two")
        if self.fault_threshold < 1 or self.window_s <= 0:
            raise MemoryInputInvalid("fault threshold and window must be positive")


@attrs.define(eq=False)
class AdaptiveGranule:
    """Dirty tracking of one region at 2 MiB, stepping down to the page (see module doc).

    Args:
        region_size: bytes in the region (a multiple of ``page_size``).
        config: thresholds.
        page_size: the fine granule (default: the host page).
        clock: monotonic seconds (injectable for tests).
    """

    region_size: int
    config: GranuleConfig = attrs.field(factory=GranuleConfig)
    page_size: int = HOST_PAGE_SIZE
    clock: Callable[[], float] = time.monotonic
    fine: DirtyBitmap = attrs.field(init=False)
    _coarse: DirtyBitmap = attrs.field(init=False, repr=False)
    _fine_mode: bool = attrs.field(init=False, default=False)
    _windows: dict[int, collections.deque[float]] = attrs.field(init=False, factory=dict)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.config.coarse_size < self.page_size or self.config.coarse_size % self.page_size:
            raise MemoryInputInvalid(
                f"coarse granule {self.config.coarse_size} is not a multiple of the "
                f"{self.page_size}-byte page"
            )
        self.fine = DirtyBitmap(self.region_size, self.page_size)
        blocks = -(-self.region_size // self.config.coarse_size)
        # The coarse bitmap counts blocks as its "pages" of one byte each.
        self._coarse = DirtyBitmap(blocks, 1)

    @property
    def fine_mode(self) -> bool:
        """True once the region has stepped down to the host page."""
        return self._fine_mode

    @property
    def granule(self) -> int:
        """The tracking granule in bytes right now."""
        return self.page_size if self._fine_mode else self.config.coarse_size

    def record_fault(self, offset: int) -> tuple[int, int]:
        """Record a write fault at ``offset`` in the region; returns the range now dirty.

        Returns:
            ``(start, length)`` in region bytes that this fault marked dirty (the
            caller may unprotect exactly that range).
        """
        if not 0 <= offset < self.region_size:
            raise MemoryInputInvalid(
                f"fault at {offset} lies outside the region's {self.region_size} bytes"
            )
        now = self.clock()
        block = offset // self.config.coarse_size
        with self._lock:
            if not self._fine_mode and self._count_fault(block, now):
                self._step_down()
            if self._fine_mode:
                page = offset // self.page_size
                self.fine.mark_pages(page)
                return page * self.page_size, self.page_size
            self._coarse.mark_pages(block)
            start = block * self.config.coarse_size
            return start, min(self.config.coarse_size, self.region_size - start)

    def _count_fault(self, block: int, now: float) -> bool:
        """Count one fault of ``block``; True when the block crossed the threshold."""
        window = self._windows.get(block)
        if window is None:
            window = self._windows[block] = collections.deque()
        window.append(now)
        horizon = now - self.config.window_s
        while window and window[0] <= horizon:
            window.popleft()
        return len(window) > self.config.fault_threshold

    def _step_down(self) -> None:
        self._fine_mode = True
        self._windows.clear()
        for first, count in self._coarse.snapshot_runs():
            self.fine.mark_addr(*self._block_bytes(first, count))
        self._coarse.clear()

    def _block_bytes(self, first: int, count: int) -> tuple[int, int]:
        start = first * self.config.coarse_size
        end = min((first + count) * self.config.coarse_size, self.region_size)
        return start, end - start

    def dirty_runs(self) -> list[Run]:
        """The dirty set in pages ``(first_page, npages)``: coarse blocks count whole."""
        with self._lock:
            if self._fine_mode:
                return self.fine.snapshot_runs()
            runs: list[Run] = []
            for first, count in self._coarse.snapshot_runs():
                start, length = self._block_bytes(first, count)
                runs.append((start // self.page_size, -(-length // self.page_size)))
            return runs

    def dirty_page_count(self) -> int:
        """Pages the next Diff would write."""
        return int(np.sum([count for _, count in self.dirty_runs()], dtype=np.int64))

    def reset_after_checkpoint(self) -> None:
        """Forget every mark and return to the coarse granule (after a committed snapshot)."""
        with self._lock:
            self.fine.clear()
            self._coarse.clear()
            self._windows.clear()
            self._fine_mode = False
