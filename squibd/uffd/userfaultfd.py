"""A userfaultfd handle: create, register, read events, resolve faults.

Thin and synchronous. The ioctls go through ctypes (``use_errno``), which
releases the GIL around each call, so a page server thread never blocks a
faulting thread of the same process on the GIL.

Result convention of ``copy``/``zeropage``: ``(done, err)`` where ``done``
is the number of bytes resolved from the start of the range and ``err`` is 0
or the errno that stopped the call (``EEXIST``: the next page is already
present; ``EAGAIN``: the address space is changing, read events and retry;
``ENOENT``/``ESRCH``: the range or the process is gone).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from typing import Final

import attrs

from . import _abi
from .errors import UffdUnsupported

__all__ = ["DEFAULT_FEATURES", "USERFAULTFD_DEVICE", "UffdEvent", "Userfaultfd"]

#: The device that hands out userfaultfds when the syscall is restricted.
USERFAULTFD_DEVICE: Final = "/dev/userfaultfd"
#: Features requested at UFFDIO_API: remove events (balloon/madvise), as Firecracker does.
DEFAULT_FEATURES: Final = _abi.UFFD_FEATURE_EVENT_REMOVE
#: Events read per ``read()`` call at most.
_MAX_EVENTS_PER_READ: Final = 256

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long

#: (event, word0, word1): for a page fault (UFFD_EVENT_PAGEFAULT, flags, address);
#: for a remove (UFFD_EVENT_REMOVE, start, end).
UffdEvent = tuple[int, int, int]


def _syscall_number() -> int:
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        return _abi.NR_USERFAULTFD_AARCH64
    return _abi.NR_USERFAULTFD_X86_64


def _new_fd(flags: int) -> int:
    """A new userfaultfd from the syscall, falling back to /dev/userfaultfd."""
    fd = int(_libc.syscall(ctypes.c_long(_syscall_number()), ctypes.c_int(flags)))
    if fd >= 0:
        return fd
    syscall_errno = ctypes.get_errno()
    try:
        dev = os.open(USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise UffdUnsupported(
            f"the userfaultfd syscall ({errno.errorcode.get(syscall_errno, syscall_errno)}) "
            f"and opening {USERFAULTFD_DEVICE}",
            errno.errorcode.get(exc.errno or 0, str(exc.errno)),
        ) from exc
    try:
        fd = int(_libc.ioctl(dev, _abi.USERFAULTFD_IOC_NEW, ctypes.c_void_p(flags)))
        if fd < 0:
            err = ctypes.get_errno()
            raise UffdUnsupported("USERFAULTFD_IOC_NEW", errno.errorcode.get(err, str(err)))
        return fd
    finally:
        os.close(dev)


@attrs.define(eq=False)
class Userfaultfd:
    """One userfaultfd file descriptor (owned: ``close`` closes it)."""

    fd: int
    features: int = 0
    _buf: ctypes.Array[ctypes.c_char] = attrs.field(
        factory=lambda: ctypes.create_string_buffer(64), repr=False
    )
    _closed: bool = False

    @classmethod
    def create(cls, *, features: int = DEFAULT_FEATURES, nonblocking: bool = True) -> Userfaultfd:
        """Create a userfaultfd and negotiate the API with ``features``.

        Raises:
            UffdUnsupported: the kernel refuses userfaultfd or a feature.
        """
        flags = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        uffd = cls(_new_fd(flags))
        try:
            _abi.UFFDIO_API_STRUCT.pack_into(uffd._buf, 0, _abi.UFFD_API, features, 0)
            if _libc.ioctl(uffd.fd, _abi.UFFDIO_API, uffd._buf) < 0:
                err = ctypes.get_errno()
                raise UffdUnsupported("UFFDIO_API", errno.errorcode.get(err, str(err)))
            _api, got, _ioctls = _abi.UFFDIO_API_STRUCT.unpack_from(uffd._buf, 0)
            uffd.features = got
        except BaseException:
            uffd.close()
            raise
        return uffd

    @classmethod
    def adopt(cls, fd: int) -> Userfaultfd:
        """Wrap a userfaultfd received from another process (its API is already set)."""
        return cls(fd)

    def _ioctl(self, request: int) -> int:
        if _libc.ioctl(self.fd, request, self._buf) < 0:
            return ctypes.get_errno()
        return 0

    def register(self, start: int, length: int) -> int:
        """Register ``[start, start+length)`` for missing faults; returns the ioctls bitmask.

        Raises:
            OSError: the kernel refused the range.
            UffdUnsupported: the range does not allow UFFDIO_COPY/ZEROPAGE.
        """
        _abi.UFFDIO_REGISTER_STRUCT.pack_into(
            self._buf, 0, start, length, _abi.UFFDIO_REGISTER_MODE_MISSING, 0
        )
        err = self._ioctl(_abi.UFFDIO_REGISTER)
        if err:
            raise OSError(err, f"UFFDIO_REGISTER of {length:#x} bytes at {start:#x}: "
                          f"{os.strerror(err)}")
        ioctls: int = _abi.UFFDIO_REGISTER_STRUCT.unpack_from(self._buf, 0)[3]
        needed = (1 << _abi.UFFDIO_COPY_BIT) | (1 << _abi.UFFDIO_ZEROPAGE_BIT)
        if ioctls & needed != needed:
            raise UffdUnsupported("UFFDIO_REGISTER (no COPY/ZEROPAGE on the range)", "EINVAL")
        return ioctls

    def copy(self, dst: int, src: int, length: int, *, wake: bool = True) -> tuple[int, int]:
        """UFFDIO_COPY ``length`` bytes from ``src`` (our address) to ``dst`` (the VMM's)."""
        mode = 0 if wake else _abi.UFFDIO_COPY_MODE_DONTWAKE
        _abi.UFFDIO_COPY_STRUCT.pack_into(self._buf, 0, dst, src, length, mode, 0)
        err = self._ioctl(_abi.UFFDIO_COPY)
        done: int = _abi.UFFDIO_COPY_STRUCT.unpack_from(self._buf, 0)[4]
        if err == 0:
            return length, 0
        return max(done, 0), err

    def zeropage(self, dst: int, length: int, *, wake: bool = True) -> tuple[int, int]:
        """UFFDIO_ZEROPAGE: map zero pages at ``[dst, dst+length)``."""
        mode = 0 if wake else _abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE
        _abi.UFFDIO_ZEROPAGE_STRUCT.pack_into(self._buf, 0, dst, length, mode, 0)
        err = self._ioctl(_abi.UFFDIO_ZEROPAGE)
        done: int = _abi.UFFDIO_ZEROPAGE_STRUCT.unpack_from(self._buf, 0)[3]
        if err == 0:
            return length, 0
        return max(done, 0), err

    def wake(self, start: int, length: int) -> None:
        """Wake threads waiting on faults in the range (after another path resolved them)."""
        _abi.UFFDIO_RANGE_STRUCT.pack_into(self._buf, 0, start, length)
        self._ioctl(_abi.UFFDIO_WAKE)

    def read_events(self) -> list[UffdEvent]:
        """Read the pending events without blocking (empty list when none).

        Raises:
            OSError: reading failed for another reason than "nothing pending".
        """
        try:
            data = os.read(self.fd, _abi.UFFD_MSG_SIZE * _MAX_EVENTS_PER_READ)
        except BlockingIOError:
            return []
        return [(m[0], m[4], m[5]) for m in _abi.UFFD_MSG_STRUCT.iter_unpack(data)]

    def close(self) -> None:
        """Close the descriptor (idempotent)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
