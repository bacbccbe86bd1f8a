"""The smallest compatible x86 state around a given memory manifest.

A small builder the package itself needs (the store's page-server child warms
its state converters with it) and that tests and benches build from. The
full sample states with deterministic content live in ``tests/snapshot/_states.py``.
"""

from __future__ import annotations

import os
from typing import Final

import attrs

from .compat import LAPIC_SIZE, MIB, MIN_XSAVE_SIZE, VCPU_EVENTS_SIZE
from .digest import DEFAULT_ALGORITHM
from .manifest import DEFAULT_CHUNK_SIZE, KIND_FULL, MemoryManifest, MemoryRegion
from .models import (
    CpuidEntry,
    DebugRegs,
    DTable,
    Segment,
    VmInfo,
    X86MicrovmState,
    X86Regs,
    X86Sregs,
    X86VcpuState,
    X86VmState,
)

__all__ = ["flat_segment", "minimal_manifest", "minimal_x86_state", "minimal_x86_vcpu"]

#: IA32_APIC_BASE of a boot vCPU: LAPIC at 0xFEE00000, enabled (bit 11), BSP (bit 8) (SDM 10.4.4).
_APIC_BASE_BSP: Final = 0xFEE0_0900
#: SPEC section 1: the host page.
_HOST_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
#: RFLAGS with only its always-one bit 1 set (SDM 3.4.3).
_RFLAGS_FIXED: Final = 0x2


def flat_segment(selector: int) -> Segment:
    """A flat 64-bit code/data segment with this selector."""
    return Segment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=11, present=1, dpl=3, db=0, s=1,
        l=1, g=1, avl=0, unusable=0,
    )  # fmt: skip


def minimal_x86_vcpu(
    *, rip: int, rsp: int = 0, cr0: int = 0, cr3: int = 0, cr4: int = 0, efer: int = 0
) -> X86VcpuState:
    """The smallest x86 vCPU state the compatibility check accepts, with these registers.

    One CPUID leaf, no MSRs or XCRs, zeroed xsave/lapic/events blobs of the
    pinned sizes; every other register is zero. Tests of memory files and
    lazy restore build their states from it.
    """
    names = [field.name for field in attrs.fields(X86Regs)]
    regs = X86Regs(**{**dict.fromkeys(names, 0), "rsp": rsp, "rip": rip, "rflags": _RFLAGS_FIXED})
    flat = flat_segment(0)
    sregs = X86Sregs(
        cs=flat, ds=flat, es=flat, fs=flat, gs=flat, ss=flat, tr=flat, ldt=flat,
        gdt=DTable(0, 0), idt=DTable(0, 0),
        cr0=cr0, cr2=0, cr3=cr3, cr4=cr4, cr8=0, efer=efer,
        apic_base=_APIC_BASE_BSP, interrupt_bitmap=(0, 0, 0, 0),
    )  # fmt: skip
    return X86VcpuState(
        cpuid=(CpuidEntry(function=0, index=0, flags=0, eax=0, ebx=0, ecx=0, edx=0),),
        regs=regs,
        sregs=sregs,
        xsave=bytes(MIN_XSAVE_SIZE),
        xcrs=(),
        msrs=(),
        lapic=bytes(LAPIC_SIZE),
        vcpu_events=bytes(VCPU_EVENTS_SIZE),
        mp_state=0,
        debug_regs=DebugRegs(db=(0, 0, 0, 0), dr6=0, dr7=0, flags=0),
    )


def minimal_x86_state(
    manifest: MemoryManifest, vcpus: tuple[X86VcpuState, ...]
) -> X86MicrovmState:
    """An x86 state of ``vcpus`` around ``manifest``: no clock, irqchip, PIT, devices or MMDS.

    ``mem_size_mib`` is the manifest's regions' total (the compatibility check
    requires exactly that).
    """
    mem_size = sum(region.size for region in manifest.regions)
    return X86MicrovmState(
        vm_info=VmInfo(mem_size_mib=mem_size // MIB, vcpu_count=len(vcpus)),
        vm_state=X86VmState(clock=None, irqchips=(), pit=None),
        vcpu_states=vcpus,
        device_states=(),
        mmds_state=None,
        memory=manifest,
    )


def minimal_manifest(mem_size_mib: int = 1, *, pair_id: str = "00000000-0000-4000-8000-000000000000"
                     ) -> MemoryManifest:  # fmt: skip
    """A Full manifest of one region of ``mem_size_mib`` with nothing written (no extents)."""
    size = mem_size_mib * MIB
    return MemoryManifest(
        page_size=_HOST_PAGE,
        regions=(MemoryRegion(guest_addr=0, size=size, file_offset=0),),
        kind=KIND_FULL,
        file_size=size,
        pair_id=pair_id,
        parent_pair_id=None,
        extents=(),
        digest_algorithm=DEFAULT_ALGORITHM,
        chunk_size=DEFAULT_CHUNK_SIZE,
        digests=b"",
    )
