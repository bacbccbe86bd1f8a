"""Least privilege for a VM process (issue 11): drop to an unprivileged user, then seccomp.

Called once the process has opened all it needs (``/dev/kvm``, the VM and
vCPU fds, the guest memory, its re-attach socket) and before it answers
``init``. Both steps are on by default where available:

- the uid/gid drop (``user``: a name or number; ``""`` keeps the current
  one). Supplementary groups are cleared first.
- a seccomp filter (``seccomp``) built with ``pyseccomp`` over the
  system's ``libseccomp.so.2`` (KVM-NOTES): the syscalls listed in
  :data:`ALLOWED_SYSCALLS` are allowed, anything else kills the process
  (``SCMP_ACT_KILL_PROCESS``: the whole VM process, never the daemon).
  ``no_new_privs`` is set as seccomp requires.

``/proc/PID/status`` then shows ``Seccomp: 2`` and the new ``Uid``.
"""

from __future__ import annotations

import os
import pwd
from typing import Any, Final

__all__ = ["ALLOWED_SYSCALLS", "apply_confinement", "seccomp_available"]

#: What a running VM process calls: the vCPU loop (ioctl, signals to kick
#: threads), the protocol (recvmsg/sendmsg, accept of a re-attaching daemon),
#: CPython's runtime (memory, futexes, threads, clocks) and exiting.
ALLOWED_SYSCALLS: Final = (
    # vCPUs and KVM
    "ioctl", "rt_sigreturn", "rt_sigaction", "rt_sigprocmask", "tgkill", "sigaltstack",
    # protocol and fds
    "read", "write", "writev", "readv", "recvmsg", "sendmsg", "recvfrom", "sendto",
    "accept", "accept4", "shutdown", "close", "fcntl", "poll", "ppoll", "select", "pselect6",
    "lseek", "fstat", "newfstatat", "statx", "getsockopt", "getsockname", "getpeername",
    # memory
    "mmap", "munmap", "mprotect", "madvise", "brk", "mremap",
    # threads and time
    "futex", "clone", "clone3", "set_robust_list", "rseq", "gettid", "getpid", "sched_yield",
    "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday", "getrandom",
    "sched_getaffinity", "prlimit64",
    # identity (describe) and the end
    "getuid", "geteuid", "getgid", "getegid", "exit", "exit_group",
)  # fmt: skip


def seccomp_available() -> bool:
    """Whether pyseccomp and libseccomp load here."""
    try:
        import pyseccomp  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _drop_user(user: str) -> tuple[int, int] | None:
    if not user:
        return None
    if user.isdigit():
        uid = int(user)
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            gid = uid
    else:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    return uid, gid


def _apply_seccomp(extra: tuple[str, ...] = ()) -> None:
    import pyseccomp

    flt = pyseccomp.SyscallFilter(pyseccomp.KILL_PROCESS)
    for name in ALLOWED_SYSCALLS + extra:
        try:
            flt.add_rule(pyseccomp.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            continue  # a syscall this architecture does not have
    flt.load()


def apply_confinement(settings: dict[str, Any]) -> dict[str, Any]:
    """Apply ``settings`` (``user``, ``seccomp``); returns what is in force.

    Raises:
        OSError, KeyError: the user is unknown or the drop failed.
    """
    applied: dict[str, Any] = {"uid": os.getuid(), "seccomp": False}
    dropped = _drop_user(str(settings.get("user", "")))
    if dropped is not None:
        applied["uid"], applied["gid"] = dropped
    if settings.get("seccomp") and seccomp_available():
        _apply_seccomp()
        applied["seccomp"] = True
    return applied
