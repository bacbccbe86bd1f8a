"""Sample snapshot states for the format tests, benches and the format demo.

The ``sample_*`` builders make complete, compatible states of any size with
deterministic content; ``minimal_x86_vcpu``/``minimal_x86_state`` (from
``squibd.snapshot.minimal``) build the smallest compatible x86 state around a
given manifest (memory-file and lazy-restore tests).
"""

from __future__ import annotations

import os
from typing import Final

import attrs

from squibd.snapshot.compat import (
    AARCH64_FP_REG_COUNT,
    AARCH64_FP_REG_SIZE,
    AARCH64_X_REG_COUNT,
    IRQCHIP_DATA_SIZE,
    LAPIC_SIZE,
    MIB,
    MIN_XSAVE_SIZE,
    PIT_STATE2_SIZE,
    VCPU_EVENTS_SIZE,
)
from squibd.snapshot.digest import DEFAULT_ALGORITHM, manifest_digests
from squibd.snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    KIND_FULL,
    Extent,
    MemoryManifest,
    MemoryRegion,
)
from squibd.snapshot.minimal import flat_segment, minimal_x86_state, minimal_x86_vcpu
from squibd.snapshot.models import (
    DEFAULT_PROGRAM,
    Aarch64MicrovmState,
    Aarch64VcpuState,
    Aarch64VmState,
    ClockState,
    CpuidEntry,
    DebugRegs,
    DeviceState,
    DTable,
    IrqchipState,
    MmdsState,
    MsrEntry,
    SysReg,
    VmInfo,
    X86MicrovmState,
    X86Regs,
    X86Sregs,
    X86VcpuState,
    X86VmState,
    Xcr,
)

__all__ = [
    "SAMPLE_PAIR_ID",
    "minimal_x86_state",
    "minimal_x86_vcpu",
    "pattern_memory",
    "sample_aarch64_state",
    "sample_manifest",
    "sample_x86_state",
]

#: A typical MSR count of a KVM vCPU (KVM-NOTES: 41 MSRs from KVM_GET_MSR_INDEX_LIST).
SAMPLE_MSR_COUNT: Final = 41
#: A typical number of CPUID leaves KVM reports.
SAMPLE_CPUID_COUNT: Final = 24
#: Three in-kernel irqchips on x86: PIC master, PIC slave, IOAPIC (asm/kvm.h).
X86_IRQCHIP_COUNT: Final = 3
#: Long-mode code segment selector used by the sample (any valid value works).
_SAMPLE_CS: Final = 0x33
#: The pair id of sample manifests unless one is given (deterministic content).
SAMPLE_PAIR_ID: Final = "5e1f0000-0000-4000-8000-000000000001"
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
#: Two KVM_REG_ARM64 system-register ids (MPIDR_EL1-like), for the sample only.
_SYSREG_A: Final = 0x6030_0000_0013_C005
_SYSREG_B: Final = 0x6030_0000_0013_C006


def _blob(seed: int, size: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(size))


def _x86_vcpu(index: int) -> X86VcpuState:
    names = [field.name for field in attrs.fields(X86Regs)]
    regs = X86Regs(**{name: index * 0x1000 + r for r, name in enumerate(names)})
    sregs = X86Sregs(
        cs=flat_segment(_SAMPLE_CS), ds=flat_segment(0x2B), es=flat_segment(0x2B),
        fs=flat_segment(0x2B), gs=flat_segment(0x2B), ss=flat_segment(0x2B),
        tr=flat_segment(0x40), ldt=flat_segment(0),
        gdt=DTable(0x500, 0x7F), idt=DTable(0x600, 0xFFF),
        cr0=0x8000_0031, cr2=0, cr3=0x9000, cr4=0x6A0, cr8=0, efer=0xD00,
        apic_base=0xFEE0_0900 if index == 0 else 0xFEE0_0800, interrupt_bitmap=(0, 0, 0, 0),
    )  # fmt: skip
    return X86VcpuState(
        cpuid=tuple(
            CpuidEntry(function=f, index=0, flags=0, eax=f * 3, ebx=f * 5, ecx=f * 7, edx=f * 11)
            for f in range(SAMPLE_CPUID_COUNT)
        ),
        regs=regs,
        sregs=sregs,
        xsave=_blob(index, MIN_XSAVE_SIZE),
        xcrs=(Xcr(xcr=0, value=0x7),),
        msrs=tuple(
            MsrEntry(index=0xC000_0080 + i, data=(index << 32) | i) for i in range(SAMPLE_MSR_COUNT)
        ),
        lapic=_blob(index + 1, LAPIC_SIZE),
        vcpu_events=bytes(VCPU_EVENTS_SIZE),
        mp_state=0,
        debug_regs=DebugRegs(db=(0, 0, 0, 0), dr6=0xFFFF0FF0, dr7=0x400, flags=0),
    )


def _devices() -> tuple[DeviceState, ...]:
    devices = [
        DeviceState(kind="serial", id="com1", mmio_slot=0, blob=b"\x00" * 16),
        DeviceState(kind="virtio-block", id="rootfs", mmio_slot=1, blob=_blob(2, 256)),
        DeviceState(kind="virtio-net", id="eth0", mmio_slot=2, blob=_blob(3, 128)),
    ]
    return tuple(sorted(devices, key=lambda d: (d.mmio_slot, d.id)))


def pattern_memory(size: int) -> bytes:
    """Deterministic guest memory: every page starts with its page number."""
    pages = size // _PAGE_SIZE
    page_tail = bytes(_PAGE_SIZE - 8)
    return b"".join(page.to_bytes(8, "little") + page_tail for page in range(pages))


def sample_manifest(
    mem_size_mib: int, *, memory: bytes | None = None, pair_id: str | None = None
) -> MemoryManifest:
    """A Full manifest of one region of ``mem_size_mib``; digests of ``memory`` if given."""
    size = mem_size_mib * MIB
    extents = (Extent(0, size),)
    data = memory if memory is not None else bytes(size)
    digests = manifest_digests(lambda offset, length: data[offset : offset + length], extents)
    return MemoryManifest(
        page_size=_PAGE_SIZE,
        regions=(MemoryRegion(guest_addr=0, size=size, file_offset=0),),
        kind=KIND_FULL,
        file_size=size,
        pair_id=pair_id or SAMPLE_PAIR_ID,
        parent_pair_id=None,
        extents=extents,
        digest_algorithm=DEFAULT_ALGORITHM,
        chunk_size=DEFAULT_CHUNK_SIZE,
        digests=digests,
    )


def sample_x86_state(
    vcpu_count: int = 2, mem_size_mib: int = 4, *, manifest: MemoryManifest | None = None
) -> X86MicrovmState:
    """A complete, compatible x86_64 state with deterministic content."""
    return X86MicrovmState(
        vm_info=VmInfo(
            mem_size_mib=mem_size_mib, vcpu_count=vcpu_count, track_dirty_pages=True,
            guest_program=DEFAULT_PROGRAM, guest_params={"stride": 1},
        ),
        vm_state=X86VmState(
            clock=ClockState(clock=123_456_789, flags=0),
            irqchips=tuple(
                IrqchipState(chip_id=i, data=_blob(i, IRQCHIP_DATA_SIZE))
                for i in range(X86_IRQCHIP_COUNT)
            ),
            pit=_blob(9, PIT_STATE2_SIZE),
        ),
        vcpu_states=tuple(_x86_vcpu(i) for i in range(vcpu_count)),
        device_states=_devices(),
        mmds_state=MmdsState(data_json='{"latest": {"meta-data": {}}}', token_ttl_seconds=60),
        memory=manifest or sample_manifest(mem_size_mib),
    )


def sample_aarch64_state(vcpu_count: int = 2, mem_size_mib: int = 4) -> Aarch64MicrovmState:
    """A complete, compatible aarch64 state with deterministic content."""
    vcpus = tuple(
        Aarch64VcpuState(
            x=tuple(i * 100 + r for r in range(AARCH64_X_REG_COUNT)),
            sp=0x8000_0000, pc=0x8008_0000 + i, pstate=0x3C5,
            v=tuple(_blob(r, AARCH64_FP_REG_SIZE) for r in range(AARCH64_FP_REG_COUNT)),
            fpsr=0, fpcr=0,
            sys_regs=(SysReg(id=_SYSREG_A, value=i), SysReg(id=_SYSREG_B, value=1)),
            psci_state="On" if i == 0 else "Off",
        )
        for i in range(vcpu_count)
    )
    return Aarch64MicrovmState(
        vm_info=VmInfo(mem_size_mib=mem_size_mib, vcpu_count=vcpu_count, kernel_path="/vmlinux"),
        vm_state=Aarch64VmState(gic_blob=_blob(5, 512)),
        vcpu_states=vcpus,
        device_states=_devices(),
        mmds_state=None,
        memory=sample_manifest(mem_size_mib),
    )
