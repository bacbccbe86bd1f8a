"""Errors of the KVM backend, each named by its cause."""

from __future__ import annotations

import os

__all__ = [
    "GuestProgramError",
    "KvmError",
    "KvmIoctlError",
    "KvmUnavailable",
    "KvmUnsupported",
    "VcpuLimitExceeded",
]


class KvmError(Exception):
    """Base class of every error raised by ``squibd.kvm``."""


class KvmUnavailable(KvmError):
    """``/dev/kvm`` cannot be opened (absent, or no permission)."""

    def __init__(self, path: str, error: OSError) -> None:
        self.path = path
        self.errno = error.errno
        super().__init__(
            f"cannot open {path}: {error.strerror or error}; this host needs KVM "
            "(load kvm_intel or kvm_amd, and give this user access to the device)"
        )


class KvmUnsupported(KvmError):
    """The host's KVM lacks a capability squibd needs; names the capability."""

    def __init__(self, capability: str, detail: str = "") -> None:
        self.capability = capability
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"this host's KVM lacks the capability {capability}{extra}; "
            "squibd cannot run VMs here without it"
        )


class KvmIoctlError(KvmError):
    """A KVM ioctl failed; names the ioctl and the OS error."""

    def __init__(self, ioctl_name: str, errno_value: int, detail: str = "") -> None:
        self.ioctl_name = ioctl_name
        self.errno = errno_value
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"{ioctl_name} failed: {os.strerror(errno_value)} (os error {errno_value}){extra}"
        )


class VcpuLimitExceeded(KvmError):
    """More vCPUs were requested than KVM allows on this host."""

    def __init__(self, requested: int, maximum: int) -> None:
        self.requested = requested
        self.maximum = maximum
        super().__init__(
            f"vcpu_count {requested} is above the {maximum} vCPUs KVM allows per VM "
            f"on this host; ask for at most {maximum}"
        )


class GuestProgramError(KvmError, ValueError):
    """A built-in guest program was asked for with a bad name or parameters."""
