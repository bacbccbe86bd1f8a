"""What ``/proc`` says of a process, for the VM-process tests."""

from __future__ import annotations


def proc_status(pid: int) -> dict[str, str]:
    """``/proc/PID/status`` as a mapping (``Uid``, ``Seccomp``, ``TracerPid``, ...)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)
