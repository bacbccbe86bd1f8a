"""Which pages the restored vCPUs touch first: found by walking the guest page tables.

For each x86_64 vCPU of the state file, the linear addresses it needs at
once are its RIP, its stack (RSP and the slot a push writes, RSP - 8) and
the descriptor tables an interrupt or exception would read (GDT, IDT, TSS).
Each is translated through the guest's page tables starting at CR3, read
from the memory file (newest version in a Diff chain); every page-table page
on the way is wanted too, and so are the paravirtual areas KVM writes as soon
as the vCPU runs (kvmclock, steal time, PV EOI, async PF: from the MSRs).
The result is a list of memory-file offsets of host pages, in first-needed
order, without duplicates. Unknown or unsupported paging modes yield only
what could be resolved; this is a heuristic for speed, never a correctness
requirement.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from squibd.snapshot.manifest import MemoryRegion
from squibd.snapshot.models import X86VcpuState

__all__ = ["prefetch_offsets", "translate"]

# Intel SDM vol. 3A, 2.5 (control registers) and 4.5 (4/5-level paging).
CR0_PG: Final = 1 << 31
CR4_LA57: Final = 1 << 12
EFER_LMA: Final = 1 << 10
PTE_PRESENT: Final = 1 << 0
PTE_PAGE_SIZE: Final = 1 << 7
#: Physical-address bits 51:12 of a paging-structure entry (and of CR3).
PTE_ADDR_MASK: Final = 0x000F_FFFF_FFFF_F000
PAGE_SHIFT: Final = 12
LEVEL_BITS: Final = 9
ENTRIES_MASK: Final = (1 << LEVEL_BITS) - 1
ENTRY_SIZE: Final = 8
#: Levels at which PS=1 maps a large page (PDPTE: 1 GiB, PDE: 2 MiB).
LARGE_PAGE_LEVELS: Final = (2, 3)
#: Bytes a push writes below RSP in 64-bit mode.
STACK_SLOT: Final = 8
#: Paravirtual areas KVM itself writes when a vCPU runs, named by guest-physical
#: addresses in MSRs (Documentation/virt/kvm/x86/msr.rst): MSR index -> mask of
#: the address bits. Bit 0 of each is the enable bit.
PV_AREA_MSRS: Final[dict[int, int]] = {
    0x12: ~0x1,  # MSR_KVM_SYSTEM_TIME (kvmclock, old)
    0x4B564D01: ~0x1,  # MSR_KVM_SYSTEM_TIME_NEW (kvmclock)
    0x4B564D02: ~0x3F,  # MSR_KVM_ASYNC_PF_EN
    0x4B564D03: ~0x3F,  # MSR_KVM_STEAL_TIME
    0x4B564D04: ~0x1,  # MSR_KVM_PV_EOI_EN
}
PV_AREA_ENABLED: Final = 1 << 0
_U64: Final = struct.Struct("<Q")

ReadFn = Callable[[int, int], bytes]
"""Reads ``length`` bytes at a memory-file offset."""


def _file_offset(regions: Sequence[MemoryRegion], gpa: int) -> int | None:
    for region in regions:
        if region.guest_addr <= gpa < region.guest_addr + region.size:
            return region.file_offset + gpa - region.guest_addr
    return None


def translate(
    linear: int,
    *,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    regions: Sequence[MemoryRegion],
    read: ReadFn,
) -> tuple[int | None, list[int]]:
    """Translate a linear address: ``(guest-physical address or None, table pages seen)``.

    Table pages are guest-physical addresses of the paging structures read.
    """
    if not cr0 & CR0_PG:
        return linear, []
    if not efer & EFER_LMA:
        return None, []  # 32-bit paging: not used by squibd guests; no prefetch
    levels = 5 if cr4 & CR4_LA57 else 4
    table = cr3 & PTE_ADDR_MASK
    tables: list[int] = []
    for level in range(levels, 0, -1):
        tables.append(table)
        shift = PAGE_SHIFT + LEVEL_BITS * (level - 1)
        entry_gpa = table + ((linear >> shift) & ENTRIES_MASK) * ENTRY_SIZE
        offset = _file_offset(regions, entry_gpa)
        if offset is None:
            return None, tables
        (entry,) = _U64.unpack(read(offset, ENTRY_SIZE))
        if not entry & PTE_PRESENT:
            return None, tables
        if level == 1 or (level in LARGE_PAGE_LEVELS and entry & PTE_PAGE_SIZE):
            page_mask = (1 << shift) - 1
            return (entry & PTE_ADDR_MASK & ~page_mask) | (linear & page_mask), tables
        table = entry & PTE_ADDR_MASK
    return None, tables


def _targets(vcpu: X86VcpuState) -> Iterable[int]:
    regs, sregs = vcpu.regs, vcpu.sregs
    yield regs.rip
    yield regs.rsp
    yield regs.rsp - STACK_SLOT
    yield sregs.gdt.base
    yield sregs.idt.base
    yield sregs.tr.base


def _pv_areas(vcpu: X86VcpuState) -> Iterable[int]:
    """Guest-physical addresses of the enabled paravirtual areas of ``vcpu``."""
    for msr in vcpu.msrs:
        mask = PV_AREA_MSRS.get(msr.index)
        if mask is not None and msr.data & PV_AREA_ENABLED:
            yield msr.data & mask


def prefetch_offsets(
    vcpus: Iterable[object],
    regions: Sequence[MemoryRegion],
    read: ReadFn,
    page_size: int,
) -> list[int]:
    """Memory-file offsets of the pages the vCPUs need first (page aligned, in order).

    ``vcpus`` are the state file's vCPU states; non-x86_64 ones are skipped.
    """
    seen: set[int] = set()
    order: list[int] = []

    def want(gpa: int) -> None:
        offset = _file_offset(regions, gpa)
        if offset is None:
            return
        page = offset - offset % page_size
        if page not in seen:
            seen.add(page)
            order.append(page)

    for vcpu in vcpus:
        if not isinstance(vcpu, X86VcpuState):
            continue
        sregs = vcpu.sregs
        for linear in _targets(vcpu):
            gpa, tables = translate(
                linear % (1 << 64),
                cr0=sregs.cr0,
                cr3=sregs.cr3,
                cr4=sregs.cr4,
                efer=sregs.efer,
                regions=regions,
                read=read,
            )
            for table in tables:
                want(table)
            if gpa is not None:
                want(gpa)
        for gpa in _pv_areas(vcpu):
            want(gpa)
    return order
