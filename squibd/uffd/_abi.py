"""The userfaultfd kernel ABI: constants, ioctl numbers and struct layouts.

Every number here comes from ``/usr/include/linux/userfaultfd.h`` (Linux
6.x) and the generic ``_IOC`` encoding of ``asm-generic/ioctl.h``;
``tests/uffd/test_abi.py`` compiles a C program with gcc and checks each one.
Structs are ``struct.Struct`` layouts (native little-endian, no padding: every
field of these structs is a naturally aligned 64-bit word, except the
``uffd_msg`` header).
"""

from __future__ import annotations

import struct
from typing import Final

# --- asm-generic/ioctl.h -------------------------------------------------------
_IOC_NRSHIFT: Final = 0
_IOC_TYPESHIFT: Final = 8
_IOC_SIZESHIFT: Final = 16
_IOC_DIRSHIFT: Final = 30
_IOC_NONE: Final = 0
_IOC_WRITE: Final = 1
_IOC_READ: Final = 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (kind << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


# --- struct layouts (linux/userfaultfd.h) ----------------------------------------
#: struct uffdio_api { u64 api; u64 features; u64 ioctls; }
UFFDIO_API_STRUCT: Final = struct.Struct("<QQQ")
#: struct uffdio_range { u64 start; u64 len; }
UFFDIO_RANGE_STRUCT: Final = struct.Struct("<QQ")
#: struct uffdio_register { struct uffdio_range range; u64 mode; u64 ioctls; }
UFFDIO_REGISTER_STRUCT: Final = struct.Struct("<QQQQ")
#: struct uffdio_copy { u64 dst; u64 src; u64 len; u64 mode; s64 copy; }
UFFDIO_COPY_STRUCT: Final = struct.Struct("<QQQQq")
#: struct uffdio_zeropage { struct uffdio_range range; u64 mode; s64 zeropage; }
UFFDIO_ZEROPAGE_STRUCT: Final = struct.Struct("<QQQq")
#: struct uffd_msg: u8 event, u8/u16/u32 reserved, then a 24-byte union whose
#: pagefault member is { u64 flags; u64 address; u32 ptid; } and whose remove
#: member is { u64 start; u64 end; }.
UFFD_MSG_STRUCT: Final = struct.Struct("<BBHIQQQ")
UFFD_MSG_SIZE: Final = UFFD_MSG_STRUCT.size

# --- ioctl numbers ----------------------------------------------------------------
USERFAULTFD_IOC: Final = 0xAA
#: ioctl on /dev/userfaultfd that returns a new userfaultfd (flags as argument).
USERFAULTFD_IOC_NEW: Final = _ioc(_IOC_NONE, USERFAULTFD_IOC, 0x00, 0)
UFFDIO: Final = 0xAA
UFFDIO_API: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x3F, UFFDIO_API_STRUCT.size)
UFFDIO_REGISTER: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x00, UFFDIO_REGISTER_STRUCT.size)
UFFDIO_UNREGISTER: Final = _ioc(_IOC_READ, UFFDIO, 0x01, UFFDIO_RANGE_STRUCT.size)
UFFDIO_WAKE: Final = _ioc(_IOC_READ, UFFDIO, 0x02, UFFDIO_RANGE_STRUCT.size)
UFFDIO_COPY: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x03, UFFDIO_COPY_STRUCT.size)
UFFDIO_ZEROPAGE: Final = _ioc(_IOC_READ | _IOC_WRITE, UFFDIO, 0x04, UFFDIO_ZEROPAGE_STRUCT.size)

# --- values -------------------------------------------------------------------------
UFFD_API: Final = 0xAA
UFFD_EVENT_PAGEFAULT: Final = 0x12
UFFD_EVENT_FORK: Final = 0x13
UFFD_EVENT_REMAP: Final = 0x14
UFFD_EVENT_REMOVE: Final = 0x15
UFFD_EVENT_UNMAP: Final = 0x16
UFFD_PAGEFAULT_FLAG_WRITE: Final = 1 << 0
UFFD_FEATURE_EVENT_REMOVE: Final = 1 << 3
UFFDIO_REGISTER_MODE_MISSING: Final = 1 << 0
UFFDIO_COPY_MODE_DONTWAKE: Final = 1 << 0
UFFDIO_ZEROPAGE_MODE_DONTWAKE: Final = 1 << 0
#: Bit positions in uffdio_register.ioctls of the range ioctls we need.
UFFDIO_COPY_BIT: Final = 0x03
UFFDIO_ZEROPAGE_BIT: Final = 0x04
UFFDIO_WAKE_BIT: Final = 0x02

#: ``__NR_userfaultfd`` on x86_64 (arch/x86/entry/syscalls/syscall_64.tbl).
NR_USERFAULTFD_X86_64: Final = 323
#: ``__NR_userfaultfd`` on aarch64 (include/uapi/asm-generic/unistd.h).
NR_USERFAULTFD_AARCH64: Final = 282

#: Names checked against the C header by the ABI test: name -> value.
CHECKED_CONSTANTS: Final[dict[str, int]] = {
    "USERFAULTFD_IOC_NEW": USERFAULTFD_IOC_NEW,
    "UFFDIO_API": UFFDIO_API,
    "UFFDIO_REGISTER": UFFDIO_REGISTER,
    "UFFDIO_UNREGISTER": UFFDIO_UNREGISTER,
    "UFFDIO_WAKE": UFFDIO_WAKE,
    "UFFDIO_COPY": UFFDIO_COPY,
    "UFFDIO_ZEROPAGE": UFFDIO_ZEROPAGE,
    "UFFD_API": UFFD_API,
    "UFFD_EVENT_PAGEFAULT": UFFD_EVENT_PAGEFAULT,
    "UFFD_EVENT_REMOVE": UFFD_EVENT_REMOVE,
    "UFFD_PAGEFAULT_FLAG_WRITE": UFFD_PAGEFAULT_FLAG_WRITE,
    "UFFD_FEATURE_EVENT_REMOVE": UFFD_FEATURE_EVENT_REMOVE,
    "UFFDIO_REGISTER_MODE_MISSING": UFFDIO_REGISTER_MODE_MISSING,
    "UFFDIO_COPY_MODE_DONTWAKE": UFFDIO_COPY_MODE_DONTWAKE,
    "UFFDIO_ZEROPAGE_MODE_DONTWAKE": UFFDIO_ZEROPAGE_MODE_DONTWAKE,
    "_UFFDIO_COPY": UFFDIO_COPY_BIT,
    "_UFFDIO_ZEROPAGE": UFFDIO_ZEROPAGE_BIT,
    "_UFFDIO_WAKE": UFFDIO_WAKE_BIT,
    "sizeof(struct uffdio_api)": UFFDIO_API_STRUCT.size,
    "sizeof(struct uffdio_range)": UFFDIO_RANGE_STRUCT.size,
    "sizeof(struct uffdio_register)": UFFDIO_REGISTER_STRUCT.size,
    "sizeof(struct uffdio_copy)": UFFDIO_COPY_STRUCT.size,
    "sizeof(struct uffdio_zeropage)": UFFDIO_ZEROPAGE_STRUCT.size,
    "sizeof(struct uffd_msg)": UFFD_MSG_SIZE,
    "offsetof(struct uffdio_copy, copy)": 32,
    "offsetof(struct uffdio_zeropage, zeropage)": 24,
    "offsetof(struct uffd_msg, arg.pagefault.address)": 16,
    "offsetof(struct uffd_msg, arg.remove.start)": 8,
    "offsetof(struct uffd_msg, arg.remove.end)": 16,
}
