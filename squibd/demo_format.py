"""The snapshot-format demo (issue 2) and the sample states it is built from.

Until the daemon exists, ``make demo`` runs this: it builds a state (2 vCPUs,
a few devices, patterned memory), writes a real snapshot pair through
:class:`~squibd.snapshot.commit.PairTransaction`, describes it, corrupts a
copy of the state file and describes that too.

The ``sample_*`` builders make complete, compatible states of any size with
deterministic content; the format tests and ``bench/state_codec.py`` use
them as well. ``minimal_x86_vcpu``/``minimal_x86_state`` build the smallest
compatible x86 state around a given manifest (memory-file and lazy-restore
tests).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import Final

import attrs

from .snapshot.compat import (
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
from .snapshot.digest import DEFAULT_ALGORITHM, manifest_digests
from .snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    KIND_FULL,
    Extent,
    MemoryManifest,
    MemoryRegion,
)
from .snapshot.models import (
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
    Segment,
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
    "main",
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
#: IA32_APIC_BASE of a boot vCPU: LAPIC at 0xFEE00000, enabled (bit 11), BSP (bit 8) (SDM 10.4.4).
_APIC_BASE_BSP: Final = 0xFEE0_0900
#: RFLAGS with only its always-one bit 1 set (SDM 3.4.3).
_RFLAGS_FIXED: Final = 0x2
#: Two KVM_REG_ARM64 system-register ids (MPIDR_EL1-like), for the sample only.
_SYSREG_A: Final = 0x6030_0000_0013_C005
_SYSREG_B: Final = 0x6030_0000_0013_C006


def _blob(seed: int, size: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(size))


def _segment(selector: int) -> Segment:
    return Segment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=11, present=1, dpl=3, db=0, s=1,
        l=1, g=1, avl=0, unusable=0,
    )  # fmt: skip


def _x86_vcpu(index: int) -> X86VcpuState:
    names = [field.name for field in attrs.fields(X86Regs)]
    regs = X86Regs(**{name: index * 0x1000 + r for r, name in enumerate(names)})
    sregs = X86Sregs(
        cs=_segment(_SAMPLE_CS), ds=_segment(0x2B), es=_segment(0x2B), fs=_segment(0x2B),
        gs=_segment(0x2B), ss=_segment(0x2B), tr=_segment(0x40), ldt=_segment(0),
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
    flat = _segment(0)
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
            guest_program="counter", guest_params={"stride": 1},
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


#: Guest memory of the demo VM.
DEMO_MEM_MIB: Final = 16
DEMO_VCPUS: Final = 2


def _banner(text: str) -> None:
    print(f"\n=== {text} ===")


def write_demo_pair(directory: str) -> tuple[str, str]:
    """Write a real snapshot pair (2 vCPUs, devices, patterned memory) into ``directory``."""
    from .snapshot.commit import PairTransaction
    from .snapshot.envelope import encode_state
    from .snapshot.pairing import PAIR_XATTR

    snap, mem = os.path.join(directory, "demo.snap"), os.path.join(directory, "demo.mem")
    memory = pattern_memory(DEMO_MEM_MIB * MIB)
    pair_id = str(uuid.uuid4())
    state = sample_x86_state(
        DEMO_VCPUS, DEMO_MEM_MIB,
        manifest=sample_manifest(DEMO_MEM_MIB, memory=memory, pair_id=pair_id),
    )  # fmt: skip
    with PairTransaction(snap, mem) as tx:
        view = memoryview(memory)
        while view:
            view = view[os.write(tx.mem_fd, view) :]
        # A filesystem without user xattrs: size and digests still bind the pair.
        with contextlib.suppress(OSError):
            os.setxattr(tx.mem_fd, PAIR_XATTR, pair_id.encode())
        tx.commit(encode_state(state))
    return snap, mem


def main(argv: Sequence[str] | None = None) -> int:
    """Run the format demo; returns 0 when every step behaved as expected."""
    from .snapshot.describe import describe_snapshot, render_text

    parser = argparse.ArgumentParser(prog="python -m squibd.demo_format", description=__doc__)
    parser.add_argument("--dir", help="write the pair here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="squibd-demo-")
    os.makedirs(directory, exist_ok=True)
    try:
        _banner(f"writing a snapshot pair into {directory}")
        snap, mem = write_demo_pair(directory)
        print(f"{snap}: {os.path.getsize(snap)} bytes; {mem}: {os.path.getsize(mem)} bytes")
        _banner("describing it (--verify full)")
        good = describe_snapshot(snap, verify="full")
        print(render_text(good))
        _banner("describing a copy with one flipped bit")
        damaged_path = os.path.join(directory, "damaged.snap")
        data = bytearray(open(snap, "rb").read())  # noqa: SIM115 - short-lived read
        data[len(data) // 2] ^= 0x10
        with open(damaged_path, "wb") as out:
            out.write(data)
        damaged = describe_snapshot(damaged_path, memory_file=mem)
        print(render_text(damaged))
        as_expected = good.ok and not damaged.ok and damaged.crc_ok is False
        _banner("result: " + ("as expected" if as_expected else "UNEXPECTED"))
        return 0 if as_expected else 1
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
