"""ctypes layouts of the KVM structs squibd uses (x86_64).

From ``/usr/include/linux/kvm.h`` and ``asm/kvm.h``; ``tests/kvm/test_abi.py``
checks every size and field offset against the headers with gcc. Structs
whose layout squibd never reads (LAPIC, vCPU events, PIT, XSAVE) are kept as
raw bytes of the sizes below.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Final

__all__ = [
    "KVM_INTERNAL_ERROR_DATA_WORDS",
    "KVM_IRQCHIP_DATA_SIZE",
    "KVM_LAPIC_STATE_SIZE",
    "KVM_MAX_XCRS",
    "KVM_NR_INTERRUPTS",
    "KVM_PIT_STATE2_SIZE",
    "KVM_RUN_EXIT_UNION_SIZE",
    "KVM_VCPU_EVENTS_SIZE",
    "KVM_XSAVE_SIZE",
    "SREGS_SEGMENTS",
    "KvmClearDirtyLog",
    "KvmClockData",
    "KvmCpuid2Header",
    "KvmCpuidEntry2",
    "KvmDebugregs",
    "KvmDirtyGfn",
    "KvmDirtyLog",
    "KvmDtable",
    "KvmEnableCap",
    "KvmIrqchip",
    "KvmMpState",
    "KvmMsrEntry",
    "KvmMsrListHeader",
    "KvmMsrsHeader",
    "KvmPitConfig",
    "KvmRegs",
    "KvmRun",
    "KvmRunExit",
    "KvmRunFailEntry",
    "KvmRunInternal",
    "KvmRunIo",
    "KvmRunMmio",
    "KvmSegment",
    "KvmSregs",
    "KvmUserspaceMemoryRegion",
    "KvmXcr",
    "KvmXcrs",
    "cpuid2_buffer",
    "msr_list_buffer",
    "msrs_buffer",
    "u8",
    "u16",
    "u32",
    "u64",
]

u8 = ctypes.c_uint8
u16 = ctypes.c_uint16
u32 = ctypes.c_uint32
u64 = ctypes.c_uint64


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """``struct kvm_userspace_memory_region``."""

    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class KvmRegs(ctypes.Structure):
    """``struct kvm_regs`` (asm/kvm.h)."""

    _fields_ = [
        (name, u64)
        for name in (
            [
                "rax",
                "rbx",
                "rcx",
                "rdx",
                "rsi",
                "rdi",
                "rsp",
                "rbp",
                "r8",
                "r9",
                "r10",
                "r11",
                "r12",
                "r13",
                "r14",
                "r15",
                "rip",
                "rflags",
            ]
        )
    ]


class KvmSegment(ctypes.Structure):
    """``struct kvm_segment``."""

    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class KvmDtable(ctypes.Structure):
    """``struct kvm_dtable``."""

    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


#: ``KVM_NR_INTERRUPTS`` (asm/kvm.h): 256 interrupt bits in ``kvm_sregs``.
KVM_NR_INTERRUPTS: Final = 256
SREGS_SEGMENTS: Final = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class KvmSregs(ctypes.Structure):
    """``struct kvm_sregs``."""

    _fields_ = [
        *[(name, KvmSegment) for name in SREGS_SEGMENTS],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        ("cr0", u64),
        ("cr2", u64),
        ("cr3", u64),
        ("cr4", u64),
        ("cr8", u64),
        ("efer", u64),
        ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class KvmCpuidEntry2(ctypes.Structure):
    """``struct kvm_cpuid_entry2``."""

    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class KvmCpuid2Header(ctypes.Structure):
    """``struct kvm_cpuid2`` without its flexible entry array."""

    _fields_ = [("nent", u32), ("padding", u32)]


@functools.cache
def _cpuid2_type(count: int) -> type[ctypes.Structure]:
    class _Cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * count)]

    return _Cpuid2


def cpuid2_buffer(count: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``count`` entries."""
    buf = _cpuid2_type(count)()
    buf.nent = count
    return buf


class KvmMsrEntry(ctypes.Structure):
    """``struct kvm_msr_entry``."""

    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrsHeader(ctypes.Structure):
    """``struct kvm_msrs`` without its flexible entry array."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


@functools.cache
def _msrs_type(count: int) -> type[ctypes.Structure]:
    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * count)]

    return _Msrs


def msrs_buffer(count: int) -> ctypes.Structure:
    """A ``struct kvm_msrs`` with room for ``count`` entries."""
    buf = _msrs_type(count)()
    buf.nmsrs = count
    return buf


class KvmMsrListHeader(ctypes.Structure):
    """``struct kvm_msr_list`` without its flexible index array."""

    _fields_ = [("nmsrs", u32)]


def msr_list_buffer(count: int) -> ctypes.Structure:
    """A ``struct kvm_msr_list`` with room for ``count`` indices."""

    class _MsrList(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * count)]

    buf = _MsrList()
    buf.nmsrs = count
    return buf


class KvmXcr(ctypes.Structure):
    """``struct kvm_xcr``."""

    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


#: ``KVM_MAX_XCRS`` (asm/kvm.h).
KVM_MAX_XCRS: Final = 16


class KvmXcrs(ctypes.Structure):
    """``struct kvm_xcrs``."""

    _fields_ = [
        ("nr_xcrs", u32),
        ("flags", u32),
        ("xcrs", KvmXcr * KVM_MAX_XCRS),
        ("padding", u64 * 16),
    ]


class KvmDebugregs(ctypes.Structure):
    """``struct kvm_debugregs``."""

    _fields_ = [
        ("db", u64 * 4),
        ("dr6", u64),
        ("dr7", u64),
        ("flags", u64),
        ("reserved", u64 * 9),
    ]


class KvmMpState(ctypes.Structure):
    """``struct kvm_mp_state``."""

    _fields_ = [("mp_state", u32)]


class KvmClockData(ctypes.Structure):
    """``struct kvm_clock_data``."""

    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


#: Size of the union in ``struct kvm_irqchip`` (``char dummy[512]``).
KVM_IRQCHIP_DATA_SIZE: Final = 512


class KvmIrqchip(ctypes.Structure):
    """``struct kvm_irqchip`` (the chip union kept as raw bytes)."""

    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", ctypes.c_char * KVM_IRQCHIP_DATA_SIZE)]


class KvmPitConfig(ctypes.Structure):
    """``struct kvm_pit_config``."""

    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class KvmDirtyLog(ctypes.Structure):
    """``struct kvm_dirty_log`` (the union holds the bitmap pointer)."""

    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class KvmClearDirtyLog(ctypes.Structure):
    """``struct kvm_clear_dirty_log``."""

    _fields_ = [
        ("slot", u32),
        ("num_pages", u32),
        ("first_page", u64),
        ("dirty_bitmap", u64),
    ]


class KvmDirtyGfn(ctypes.Structure):
    """``struct kvm_dirty_gfn``: one dirty-ring entry."""

    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class KvmEnableCap(ctypes.Structure):
    """``struct kvm_enable_cap``."""

    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


# Structs squibd keeps as opaque kernel bytes; sizes from the headers.
#: ``sizeof(struct kvm_lapic_state)`` (``KVM_APIC_REG_SIZE`` = 0x400).
KVM_LAPIC_STATE_SIZE: Final = 1024
#: ``sizeof(struct kvm_vcpu_events)``.
KVM_VCPU_EVENTS_SIZE: Final = 64
#: ``sizeof(struct kvm_pit_state2)``.
KVM_PIT_STATE2_SIZE: Final = 112
#: ``sizeof(struct kvm_xsave)``: the legacy 4 KiB area; XSAVE2 may need more.
KVM_XSAVE_SIZE: Final = 4096


class KvmRunIo(ctypes.Structure):
    """The ``io`` member of the ``kvm_run`` exit union."""

    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class KvmRunFailEntry(ctypes.Structure):
    """The ``fail_entry`` member of the ``kvm_run`` exit union."""

    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class KvmRunMmio(ctypes.Structure):
    """The ``mmio`` member of the ``kvm_run`` exit union."""

    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


#: ``KVM_INTERNAL_ERROR_MAX_DATA`` words in ``internal.data``.
KVM_INTERNAL_ERROR_DATA_WORDS: Final = 16


class KvmRunInternal(ctypes.Structure):
    """The ``internal`` member of the ``kvm_run`` exit union."""

    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * KVM_INTERNAL_ERROR_DATA_WORDS)]


#: Size of the exit union in ``struct kvm_run`` (``char padding[256]``).
KVM_RUN_EXIT_UNION_SIZE: Final = 256


class KvmRunExit(ctypes.Union):
    """The exit union of ``struct kvm_run`` (the members squibd reads)."""

    _fields_ = [
        ("io", KvmRunIo),
        ("fail_entry", KvmRunFailEntry),
        ("mmio", KvmRunMmio),
        ("internal", KvmRunInternal),
        ("padding", ctypes.c_char * KVM_RUN_EXIT_UNION_SIZE),
    ]


class KvmRun(ctypes.Structure):
    """The head of ``struct kvm_run`` up to and including the exit union."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", KvmRunExit),
    ]
