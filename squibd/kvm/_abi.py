"""The kernel ABI of KVM: ioctl numbers, constants, libc calls (and the structs).

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

from . import _structs
from ._structs import *  # noqa: F403 (re-exported: callers write _abi.KvmRun ...)

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


# --- ioctl numbers -----------------------------------------------------------
KVM_GET_API_VERSION: Final = _io(0x00)
KVM_CREATE_VM: Final = _io(0x01)
KVM_GET_MSR_INDEX_LIST: Final = _iowr(0x02, ctypes.sizeof(_structs.KvmMsrListHeader))
KVM_CHECK_EXTENSION: Final = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE: Final = _io(0x04)
KVM_GET_SUPPORTED_CPUID: Final = _iowr(0x05, ctypes.sizeof(_structs.KvmCpuid2Header))
KVM_CREATE_VCPU: Final = _io(0x41)
KVM_GET_DIRTY_LOG: Final = _iow(0x42, ctypes.sizeof(_structs.KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION: Final = _iow(0x46, ctypes.sizeof(_structs.KvmUserspaceMemoryRegion))
KVM_SET_TSS_ADDR: Final = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR: Final = _iow(0x48, ctypes.sizeof(_structs.u64))
KVM_CREATE_IRQCHIP: Final = _io(0x60)
KVM_GET_IRQCHIP: Final = _iowr(0x62, ctypes.sizeof(_structs.KvmIrqchip))
KVM_SET_IRQCHIP: Final = _ior(0x63, ctypes.sizeof(_structs.KvmIrqchip))
KVM_CREATE_PIT2: Final = _iow(0x77, ctypes.sizeof(_structs.KvmPitConfig))
KVM_SET_CLOCK: Final = _iow(0x7B, ctypes.sizeof(_structs.KvmClockData))
KVM_GET_CLOCK: Final = _ior(0x7C, ctypes.sizeof(_structs.KvmClockData))
KVM_GET_PIT2: Final = _ior(0x9F, _structs.KVM_PIT_STATE2_SIZE)
KVM_SET_PIT2: Final = _iow(0xA0, _structs.KVM_PIT_STATE2_SIZE)
KVM_GET_TSC_KHZ: Final = _io(0xA3)
KVM_RUN: Final = _io(0x80)
KVM_GET_REGS: Final = _ior(0x81, ctypes.sizeof(_structs.KvmRegs))
KVM_SET_REGS: Final = _iow(0x82, ctypes.sizeof(_structs.KvmRegs))
KVM_GET_SREGS: Final = _ior(0x83, ctypes.sizeof(_structs.KvmSregs))
KVM_SET_SREGS: Final = _iow(0x84, ctypes.sizeof(_structs.KvmSregs))
KVM_GET_MSRS: Final = _iowr(0x88, ctypes.sizeof(_structs.KvmMsrsHeader))
KVM_SET_MSRS: Final = _iow(0x89, ctypes.sizeof(_structs.KvmMsrsHeader))
KVM_GET_LAPIC: Final = _ior(0x8E, _structs.KVM_LAPIC_STATE_SIZE)
KVM_SET_LAPIC: Final = _iow(0x8F, _structs.KVM_LAPIC_STATE_SIZE)
KVM_SET_CPUID2: Final = _iow(0x90, ctypes.sizeof(_structs.KvmCpuid2Header))
KVM_GET_CPUID2: Final = _iowr(0x91, ctypes.sizeof(_structs.KvmCpuid2Header))
KVM_GET_MP_STATE: Final = _ior(0x98, ctypes.sizeof(_structs.KvmMpState))
KVM_SET_MP_STATE: Final = _iow(0x99, ctypes.sizeof(_structs.KvmMpState))
KVM_GET_VCPU_EVENTS: Final = _ior(0x9F, _structs.KVM_VCPU_EVENTS_SIZE)
KVM_SET_VCPU_EVENTS: Final = _iow(0xA0, _structs.KVM_VCPU_EVENTS_SIZE)
KVM_GET_DEBUGREGS: Final = _ior(0xA1, ctypes.sizeof(_structs.KvmDebugregs))
KVM_SET_DEBUGREGS: Final = _iow(0xA2, ctypes.sizeof(_structs.KvmDebugregs))
KVM_ENABLE_CAP: Final = _iow(0xA3, ctypes.sizeof(_structs.KvmEnableCap))
KVM_GET_XSAVE: Final = _ior(0xA4, _structs.KVM_XSAVE_SIZE)
KVM_SET_XSAVE: Final = _iow(0xA5, _structs.KVM_XSAVE_SIZE)
KVM_GET_XCRS: Final = _ior(0xA6, ctypes.sizeof(_structs.KvmXcrs))
KVM_SET_XCRS: Final = _iow(0xA7, ctypes.sizeof(_structs.KvmXcrs))
KVM_CLEAR_DIRTY_LOG: Final = _iowr(0xC0, ctypes.sizeof(_structs.KvmClearDirtyLog))
KVM_RESET_DIRTY_RINGS: Final = _io(0xC7)
KVM_GET_XSAVE2: Final = _ior(0xCF, _structs.KVM_XSAVE_SIZE)

#: Every ioctl above by name (the header check iterates over this).
IOCTLS: Final = {
    name: value
    for name, value in dict(globals()).items()
    if name.startswith("KVM_") and isinstance(value, int) and name not in _structs.__all__
}

# --- constants (linux/kvm.h) -----------------------------------------------------
#: ``KVM_API_VERSION``.
KVM_API_VERSION: Final = 12
KVM_MEM_LOG_DIRTY_PAGES: Final = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE: Final = 1 << 0
KVM_MP_STATE_RUNNABLE: Final = 0
KVM_DIRTY_GFN_F_DIRTY: Final = 1 << 0
KVM_DIRTY_GFN_F_RESET: Final = 1 << 1
#: Page offset of the dirty ring in a vCPU fd's mapping (asm/kvm.h, x86).
KVM_DIRTY_LOG_PAGE_OFFSET: Final = 64
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
    "KVM_CAP_DIRTY_LOG_RING": 192,
    "KVM_CAP_XSAVE2": 208,
    "KVM_CAP_DIRTY_LOG_RING_ACQ_REL": 223,
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


def mmap_shared(fd: int, size: int, offset: int = 0) -> int:
    """``mmap(NULL, size, PROT_READ|PROT_WRITE, MAP_SHARED, fd, offset)``; returns the address.

    Raises:
        OSError: the mapping failed.
    """
    addr = _mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, offset)
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
