"""The kernel ABI of KVM: ctypes struct layouts, ioctl numbers, constants.

Every layout and number here comes from ``/usr/include/linux/kvm.h`` and
``/usr/include/x86_64-linux-gnu/asm/kvm.h`` (x86_64); ``tests/kvm/test_abi.py``
compiles a C program against those headers and checks each one. ioctls go
through libc's ``ioctl`` via ctypes (``use_errno=True``; the call releases the
GIL, and unsigned arguments such as ``0xfffbd000`` do not overflow as they do
with ``fcntl.ioctl``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
from typing import Final

# --- ioctl number encoding (asm-generic/ioctl.h) ----------------------------
_IOC_NRBITS: Final = 8
_IOC_TYPEBITS: Final = 8
_IOC_SIZEBITS: Final = 14
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT: Final = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT: Final = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2

#: ``KVMIO`` of linux/kvm.h.
KVMIO: Final = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (KVMIO << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, size: int) -> int:
    return _ioc(_IOC_READ, nr, size)


def _iow(nr: int, size: int) -> int:
    return _ioc(_IOC_WRITE, nr, size)


def _iowr(nr: int, size: int) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, size)


# --- structs ----------------------------------------------------------------
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


def cpuid2_buffer(count: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``count`` entries."""

    class _Cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", KvmCpuidEntry2 * count)]

    buf = _Cpuid2()
    buf.nent = count
    return buf


class KvmMsrEntry(ctypes.Structure):
    """``struct kvm_msr_entry``."""

    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class KvmMsrsHeader(ctypes.Structure):
    """``struct kvm_msrs`` without its flexible entry array."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


def msrs_buffer(count: int) -> ctypes.Structure:
    """A ``struct kvm_msrs`` with room for ``count`` entries."""

    class _Msrs(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", KvmMsrEntry * count)]

    buf = _Msrs()
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


# --- ioctl numbers -----------------------------------------------------------
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_GET_MSR_INDEX_LIST: Final = _iowr(0x02, ctypes.sizeof(KvmMsrListHeader))
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(0x05, ctypes.sizeof(KvmCpuid2Header))
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_GET_DIRTY_LOG: Final = _iow(0x42, ctypes.sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(0x48, ctypes.sizeof(u64))
KVM_CREATE_IRQCHIP: Final = _io(0x60)
KVM_GET_IRQCHIP: Final = _iowr(0x62, ctypes.sizeof(KvmIrqchip))
KVM_SET_IRQCHIP: Final = _ior(0x63, ctypes.sizeof(KvmIrqchip))
KVM_CREATE_PIT2: Final = _iow(0x77, ctypes.sizeof(KvmPitConfig))
KVM_SET_CLOCK: Final = _iow(0x7B, ctypes.sizeof(KvmClockData))
KVM_GET_CLOCK: Final = _ior(0x7C, ctypes.sizeof(KvmClockData))
KVM_GET_PIT2: Final = _ior(0x9F, KVM_PIT_STATE2_SIZE)
KVM_SET_PIT2: Final = _iow(0xA0, KVM_PIT_STATE2_SIZE)
KVM_GET_TSC_KHZ: Final = _io(0xA3)
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS: Final = _iow(0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS: Final = _ior(0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS: Final = _iow(0x84, ctypes.sizeof(KvmSregs))
KVM_GET_MSRS: Final = _iowr(0x88, ctypes.sizeof(KvmMsrsHeader))
KVM_SET_MSRS: Final = _iow(0x89, ctypes.sizeof(KvmMsrsHeader))
KVM_GET_LAPIC: Final = _ior(0x8E, KVM_LAPIC_STATE_SIZE)
KVM_SET_LAPIC: Final = _iow(0x8F, KVM_LAPIC_STATE_SIZE)
KVM_SET_CPUID2: Final = _iow(0x90, ctypes.sizeof(KvmCpuid2Header))
KVM_GET_CPUID2: Final = _iowr(0x91, ctypes.sizeof(KvmCpuid2Header))
KVM_GET_MP_STATE: Final = _ior(0x98, ctypes.sizeof(KvmMpState))
KVM_SET_MP_STATE: Final = _iow(0x99, ctypes.sizeof(KvmMpState))
KVM_GET_VCPU_EVENTS: Final = _ior(0x9F, KVM_VCPU_EVENTS_SIZE)
KVM_SET_VCPU_EVENTS: Final = _iow(0xA0, KVM_VCPU_EVENTS_SIZE)
KVM_GET_DEBUGREGS: Final = _ior(0xA1, ctypes.sizeof(KvmDebugregs))
KVM_SET_DEBUGREGS: Final = _iow(0xA2, ctypes.sizeof(KvmDebugregs))
KVM_ENABLE_CAP: Final = _iow(0xA3, ctypes.sizeof(KvmEnableCap))
KVM_GET_XSAVE: Final = _ior(0xA4, KVM_XSAVE_SIZE)
KVM_SET_XSAVE: Final = _iow(0xA5, KVM_XSAVE_SIZE)
KVM_GET_XCRS: Final = _ior(0xA6, ctypes.sizeof(KvmXcrs))
KVM_SET_XCRS: Final = _iow(0xA7, ctypes.sizeof(KvmXcrs))
KVM_CLEAR_DIRTY_LOG: Final = _iowr(0xC0, ctypes.sizeof(KvmClearDirtyLog))
KVM_GET_XSAVE2: Final = _ior(0xCF, KVM_XSAVE_SIZE)

#: Every ioctl above by name (the header check iterates over this).
IOCTLS: Final = {
    name: value
    for name, value in dict(globals()).items()
    if name.startswith("KVM_")
    and name.isupper()
    and isinstance(value, int)
    and name
    not in {
        "KVM_NR_INTERRUPTS",
        "KVM_MAX_XCRS",
        "KVM_IRQCHIP_DATA_SIZE",
        "KVM_LAPIC_STATE_SIZE",
        "KVM_VCPU_EVENTS_SIZE",
        "KVM_PIT_STATE2_SIZE",
        "KVM_XSAVE_SIZE",
        "KVM_INTERNAL_ERROR_DATA_WORDS",
        "KVM_RUN_EXIT_UNION_SIZE",
    }
}

# --- constants (linux/kvm.h) -----------------------------------------------------
#: ``KVM_API_VERSION``.
KVM_API_VERSION: Final = 12
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_MP_STATE_RUNNABLE: Final = 0
KVM_EXIT_IO_IN: Final = 0
KVM_EXIT_IO_OUT: Final = 1

#: Capability numbers (``KVM_CAP_*``) squibd queries.
CAPABILITIES: Final = {
    "KVM_CAP_IRQCHIP": 0,
    "KVM_CAP_USER_MEMORY": 3,
    "KVM_CAP_SET_TSS_ADDR": 4,
    "KVM_CAP_EXT_CPUID": 7,
    "KVM_CAP_NR_VCPUS": 9,
    "KVM_CAP_NR_MEMSLOTS": 10,
    "KVM_CAP_MP_STATE": 14,
    "KVM_CAP_PIT2": 33,
    "KVM_CAP_ADJUST_CLOCK": 39,
    "KVM_CAP_VCPU_EVENTS": 41,
    "KVM_CAP_DEBUGREGS": 50,
    "KVM_CAP_XSAVE": 55,
    "KVM_CAP_XCRS": 56,
    "KVM_CAP_GET_TSC_KHZ": 61,
    "KVM_CAP_MAX_VCPUS": 66,
    "KVM_CAP_IMMEDIATE_EXIT": 136,
    "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2": 168,
    "KVM_CAP_XSAVE2": 208,
}

#: Exit reasons (``KVM_EXIT_*``) by number, for messages.
EXIT_REASONS: Final = {
    0: "KVM_EXIT_UNKNOWN",
    1: "KVM_EXIT_EXCEPTION",
    2: "KVM_EXIT_IO",
    3: "KVM_EXIT_HYPERCALL",
    4: "KVM_EXIT_DEBUG",
    5: "KVM_EXIT_HLT",
    6: "KVM_EXIT_MMIO",
    7: "KVM_EXIT_IRQ_WINDOW_OPEN",
    8: "KVM_EXIT_SHUTDOWN",
    9: "KVM_EXIT_FAIL_ENTRY",
    10: "KVM_EXIT_INTR",
    17: "KVM_EXIT_INTERNAL_ERROR",
    24: "KVM_EXIT_SYSTEM_EVENT",
    31: "KVM_EXIT_DIRTY_RING_FULL",
}
KVM_EXIT_IO: Final = 2
KVM_EXIT_HLT: Final = 5
KVM_EXIT_MMIO: Final = 6
KVM_EXIT_SHUTDOWN: Final = 8
KVM_EXIT_FAIL_ENTRY: Final = 9
KVM_EXIT_INTR: Final = 10
KVM_EXIT_INTERNAL_ERROR: Final = 17
KVM_EXIT_SYSTEM_EVENT: Final = 24
KVM_EXIT_DIRTY_RING_FULL: Final = 31

# --- libc -----------------------------------------------------------------------
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_ioctl.restype = ctypes.c_int
_mmap = _libc.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_mmap.restype = ctypes.c_void_p
_munmap = _libc.munmap
_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_munmap.restype = ctypes.c_int
#: ``MAP_FAILED`` is ``(void *)-1``.
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


def ioctl_raw(fd: int, request: int, arg: int = 0) -> tuple[int, int]:
    """Call ``ioctl(fd, request, arg)``; return ``(result, errno)`` (errno 0 on success).

    ``arg`` is an integer or the address of a ctypes buffer
    (``ctypes.addressof``). The GIL is released during the call.
    """
    result = _ioctl(fd, request, arg)
    return result, (ctypes.get_errno() if result < 0 else 0)


def ioctl_addr(obj: ctypes.Structure | ctypes.Array[ctypes.c_char]) -> int:
    """The address of a ctypes buffer, to pass as an ioctl argument."""
    return ctypes.addressof(obj)


def mmap_shared(fd: int, size: int) -> int:
    """``mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_SHARED, fd, 0)``; returns the address.

    Raises:
        OSError: the mapping failed.
    """
    addr = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of fd {fd} failed")
    return int(addr)


def munmap(addr: int, size: int) -> None:
    """Unmap what :func:`mmap_shared` mapped."""
    _munmap(addr, size)


def read_memory(address: int, length: int) -> bytes:
    """Copy ``length`` bytes at a host address (e.g. in ``kvm_run``)."""
    return ctypes.string_at(address, length)


def write_memory(address: int, data: bytes) -> None:
    """Copy ``data`` to a host address (e.g. the I/O data area of ``kvm_run``)."""
    ctypes.memmove(address, data, len(data))
