"""Start the zygote out of reach of a tracer that follows the daemon's forks.

VM processes outlive the daemon by design (issue 11). A tracer attached to
the daemon with fork following (``strace -f``, gdb's ``follow-fork``) would
otherwise follow the zygote and every VM process it forks: it would trace
every vCPU exit of every guest, and it could not end while a VM runs on
after the daemon is gone (a harness waiting for ``strace -f squibd`` would
wait forever). So the zygote is started with ``clone(CLONE_UNTRACED)``,
which a tracer's fork following cannot override, and then ``execv``: it is
not traced, nor are the VM processes it forks. Trace one with ``strace -p``.

A raw ``clone`` copies none of the care ``os.fork`` takes of the interpreter
(its GIL among other threads, their locks): the child of a process with
other Python threads can hang before it reaches ``execv`` (seen: the GIL's
hand-over waits for a thread the child does not have). So it is used only
while the process has one thread: the daemon starts its zygote first thing,
before any other thread exists (``cli/serve.py``), and the child then runs
only calls prepared in the parent. Otherwise (a zygote restarted later,
a library user, another architecture, a seccomp filter) the zygote starts
with ``subprocess.Popen`` and a tracer follows it as before.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import platform
import select
import signal
import subprocess
import threading
from collections.abc import Sequence
from typing import Final

__all__ = ["Child", "spawn_untraced"]

_CLONE_UNTRACED: Final = 0x00800000
_SYS_CLONE: Final = {"x86_64": 56, "aarch64": 220}
_F_SETFD: Final = 2
_SYS_CLOSE_RANGE: Final = 436  # the same number on every architecture
_FD_MAX: Final = 0xFFFFFFFF

_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held, in the child too
_libc.syscall.restype = ctypes.c_long


class Child:
    """A child process started by :func:`spawn_untraced` (``Popen``'s wait, poll and kill)."""

    def __init__(self, pid: int, popen: subprocess.Popen[bytes] | None = None) -> None:
        self.pid = pid
        self._popen = popen
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """The exit status once the child ended (reaped here), else None."""
        if self._popen is not None:
            return self._popen.poll()
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0  # reaped elsewhere
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to end (``subprocess.TimeoutExpired`` after ``timeout`` s)."""
        if self._popen is not None:
            return self._popen.wait(timeout)
        if self.poll() is not None:
            assert self.returncode is not None
            return self.returncode
        try:
            fd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            fd = -1
        if fd >= 0:
            try:
                readable, _, _ = select.select([fd], [], [], timeout)
            finally:
                os.close(fd)
            if not readable:
                raise subprocess.TimeoutExpired([str(self.pid)], timeout or 0.0)
        with contextlib.suppress(ChildProcessError):
            _pid, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        if self.returncode is None:
            self.returncode = 0
        return self.returncode

    def kill(self) -> None:
        """SIGKILL the child (if it still runs)."""
        if self._popen is not None:
            self._popen.kill()
            return
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def spawn_untraced(argv: Sequence[str], pass_fd: int) -> Child:
    """Run ``argv`` (``argv[0]`` a path) with ``pass_fd`` inherited and stdin on /dev/null.

    See the module doc. Raises ``OSError`` when it cannot start.
    """
    number = _SYS_CLONE.get(platform.machine())
    if number is None or threading.active_count() != 1 or not _close_range_works():
        return _popen(argv, pass_fd)
    path = ctypes.c_char_p(os.fsencode(argv[0]))
    args = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    c_null, c_zero, c_fd = ctypes.c_int(null), ctypes.c_int(0), ctypes.c_int(pass_fd)
    c_setfd, c_code = ctypes.c_int(_F_SETFD), ctypes.c_int(127)
    # Every other fd of the daemon closes (as Popen's close_fds): some are
    # inheritable, such as the listening sockets systemd passed.
    c_close_range = ctypes.c_long(_SYS_CLOSE_RANGE)
    c_low_first, c_low_last = ctypes.c_uint(3), ctypes.c_uint(pass_fd - 1)
    c_high_first, c_high_last = ctypes.c_uint(pass_fd + 1), ctypes.c_uint(_FD_MAX)
    try:
        pid = _libc.syscall(
            ctypes.c_long(number), ctypes.c_ulong(_CLONE_UNTRACED | signal.SIGCHLD),
            None, None, None, None,
        )  # fmt: skip
        if pid == 0:  # the child: prepared calls only, then exec (or _exit)
            _libc.dup2(c_null, c_zero)
            if pass_fd > 3:
                _libc.syscall(c_close_range, c_low_first, c_low_last, c_zero)
            _libc.syscall(c_close_range, c_high_first, c_high_last, c_zero)
            _libc.fcntl(c_fd, c_setfd, c_zero)  # clear FD_CLOEXEC: the zygote's socket
            _libc.execv(path, args)
            _libc._exit(c_code)
        if pid < 0:
            code = ctypes.get_errno()
            if code in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                return _popen(argv, pass_fd)
            raise OSError(code, f"clone: {os.strerror(code)}")
    finally:
        os.close(null)
    return Child(int(pid))


def _close_range_works() -> bool:
    """Whether the kernel has ``close_range`` (Linux 5.9): asked once, on an empty range."""
    global _close_range_known
    if _close_range_known is None:
        done = _libc.syscall(ctypes.c_long(_SYS_CLOSE_RANGE), ctypes.c_uint(_FD_MAX),
                             ctypes.c_uint(_FD_MAX), ctypes.c_uint(0))  # fmt: skip
        _close_range_known = done == 0
    return _close_range_known


_close_range_known: bool | None = None


def _popen(argv: Sequence[str], pass_fd: int) -> Child:
    proc = subprocess.Popen(list(argv), pass_fds=(pass_fd,), stdin=subprocess.DEVNULL)
    return Child(proc.pid, proc)
