"""KVM dirty rings (``KVM_CAP_DIRTY_LOG_RING``): per-vCPU logs of written pages.

Theory of operation
-------------------
With the ring enabled (on the VM, before any vCPU exists), KVM appends one
``struct kvm_dirty_gfn`` ``{flags, slot, offset}`` to the writing vCPU's ring
for every page that becomes dirty, instead of setting bitmap bits
(``KVM_GET_DIRTY_LOG`` then fails with ENXIO). Each vCPU's ring is mapped from
its fd at page :data:`~squibd.kvm._abi.KVM_DIRTY_LOG_PAGE_OFFSET`. Userspace
reads entries in order from its fetch index while they carry the DIRTY
flag, marks each RESET, and then ``KVM_RESET_DIRTY_RINGS`` re-protects those
pages and frees the entries. A full ring stops the vCPU with
``KVM_EXIT_DIRTY_RING_FULL``: the runner collects that ring and re-enters.

Collected pages accumulate per slot in a :class:`RingCollector` until
:meth:`RingCollector.take` hands them out as bitmap words (the same shape as
``KvmVm.harvest_dirty_log``). x86 is TSO, so plain loads and stores give the
acquire/release ordering ``KVM_CAP_DIRTY_LOG_RING_ACQ_REL`` asks for.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Mapping
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

from . import _abi
from .errors import KvmError
from .system import check_ioctl

__all__ = ["DirtyRing", "DirtyRingInUse", "RingCollector", "ring_entries_for"]

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
_GFN_SIZE: Final = ctypes.sizeof(_abi.KvmDirtyGfn)
_BITS_PER_WORD: Final = 64


class DirtyRingInUse(KvmError):
    """The bitmap dirty log was asked for on a VM that logs through dirty rings."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        super().__init__(
            f"memory slot {slot}: this VM logs dirty pages in per-vCPU dirty rings, "
            "so KVM_GET_DIRTY_LOG is unavailable; harvest with harvest_dirty_rings()"
        )


def ring_entries_for(ring_bytes: int) -> int:
    """Number of ``kvm_dirty_gfn`` entries in a ring of ``ring_bytes``."""
    return ring_bytes // _GFN_SIZE


@attrs.define(eq=False)
class DirtyRing:
    """One vCPU's mapped dirty ring and its fetch index (not thread-safe: the
    collector serializes access)."""

    addr: int
    size: int
    entries: ctypes.Array[_abi.KvmDirtyGfn]
    fetch: int = 0

    @classmethod
    def map(cls, vcpu_fd: int, ring_bytes: int) -> DirtyRing:
        """Map the ring of a vCPU fd (the VM has the ring enabled)."""
        addr = _abi.mmap_shared(vcpu_fd, ring_bytes, _abi.KVM_DIRTY_LOG_PAGE_OFFSET * _PAGE_SIZE)
        count = ring_entries_for(ring_bytes)
        entries = (_abi.KvmDirtyGfn * count).from_address(addr)
        return cls(addr=addr, size=ring_bytes, entries=entries)

    def collect(self) -> list[tuple[int, int]]:
        """Harvested ``(slot, page offset in slot)`` pairs; marks each entry RESET."""
        out: list[tuple[int, int]] = []
        count = len(self.entries)
        while True:
            entry = self.entries[self.fetch % count]
            if not entry.flags & _abi.KVM_DIRTY_GFN_F_DIRTY:
                break
            out.append((int(entry.slot), int(entry.offset)))
            entry.flags = _abi.KVM_DIRTY_GFN_F_RESET
            self.fetch += 1
        return out

    def close(self) -> None:
        """Unmap the ring (idempotent)."""
        if self.addr:
            _abi.munmap(self.addr, self.size)
            self.addr = 0


@attrs.define(eq=False)
class RingCollector:
    """Accumulates dirty pages collected from the rings of one VM, per slot.

    Thread-safe: the vCPU threads collect on ring-full while another thread
    harvests.
    """

    vm_fd: int
    _pending: dict[int, set[int]] = attrs.field(factory=dict)
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def collect(self, rings: list[DirtyRing]) -> int:
        """Collect every given ring, then ``KVM_RESET_DIRTY_RINGS``; returns entries read."""
        with self._lock:
            total = 0
            for ring in rings:
                for slot, offset in ring.collect():
                    self._pending.setdefault(slot, set()).add(offset)
                    total += 1
            if total:
                check_ioctl("KVM_RESET_DIRTY_RINGS", self.vm_fd, _abi.KVM_RESET_DIRTY_RINGS)
            return total

    def take(self, slot_pages: Mapping[int, int]) -> dict[int, npt.NDArray[np.uint64]]:
        """Everything collected so far as bitmap words per slot (then forgotten).

        Args:
            slot_pages: slot number -> pages in the slot.
        """
        with self._lock:
            pending, self._pending = self._pending, {}
        out: dict[int, npt.NDArray[np.uint64]] = {}
        for slot, pages in slot_pages.items():
            words = np.zeros((pages + _BITS_PER_WORD - 1) // _BITS_PER_WORD, dtype=np.uint64)
            offsets = np.fromiter(pending.get(slot, ()), dtype=np.uint64)
            if offsets.size:
                np.bitwise_or.at(
                    words,
                    (offsets // _BITS_PER_WORD).astype(np.intp),
                    np.left_shift(np.uint64(1), offsets % np.uint64(_BITS_PER_WORD)),
                )
            out[slot] = words
        return out
