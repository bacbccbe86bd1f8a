"""The KVM system handle: ``/dev/kvm``, its capabilities and host-wide queries."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final, Protocol, Self

import attrs

from squibd.snapshot.models import CpuidEntry

from . import _abi
from .errors import KvmIoctlError, KvmUnavailable, KvmUnsupported

__all__ = ["KVM_DEVICE", "REQUIRED_CAPABILITIES", "FdOwner", "Kvm", "check_ioctl"]

#: The KVM device node.
KVM_DEVICE: Final = "/dev/kvm"

#: Capabilities without which squibd cannot run or snapshot a VM.
REQUIRED_CAPABILITIES: Final = (
    "KVM_CAP_USER_MEMORY",
    "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_EXT_CPUID",
    "KVM_CAP_IRQCHIP",
    "KVM_CAP_PIT2",
    "KVM_CAP_MP_STATE",
    "KVM_CAP_ADJUST_CLOCK",
    "KVM_CAP_VCPU_EVENTS",
    "KVM_CAP_DEBUGREGS",
    "KVM_CAP_XSAVE",
    "KVM_CAP_XCRS",
    "KVM_CAP_IMMEDIATE_EXIT",
)

#: First guess at the number of CPUID entries; grown on ``E2BIG``.
_CPUID_INITIAL_ENTRIES: Final = 128
#: Upper bound on CPUID entries (``KVM_MAX_CPUID_ENTRIES`` is 256).
_CPUID_MAX_ENTRIES: Final = 1024


def check_ioctl(name: str, fd: int, request: int, arg: int = 0) -> int:
    """Run an ioctl and return its non-negative result.

    Raises:
        KvmIoctlError: the ioctl failed (names it and the OS error).
    """
    result, err = _abi.ioctl_raw(fd, request, arg)
    if result < 0:
        raise KvmIoctlError(name, err)
    return result


class _HasFd(Protocol):
    fd: int


class FdOwner:
    """Mixin of the KVM handles that own one fd (``self.fd``, -1 once closed).

    :meth:`close` is idempotent; the handle is its own context manager.
    """

    __slots__ = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self: _HasFd) -> None:
        """Close the fd (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@attrs.define(eq=False)
class Kvm(FdOwner):
    """An open ``/dev/kvm`` with the capabilities this host's KVM reports.

    Use :meth:`open` to create one; close it (or use it as a context manager)
    when no VM needs it any more (VMs keep their own fds).
    """

    fd: int
    api_version: int
    #: Capability name -> value of ``KVM_CHECK_EXTENSION`` (0 = absent).
    capabilities: dict[str, int]
    _cpuid_cache: list[CpuidEntry] | None = None
    _msr_index_cache: tuple[int, ...] | None = None

    @classmethod
    def open(cls, path: str = KVM_DEVICE) -> Kvm:
        """Open the KVM device and query its API version and capabilities.

        Raises:
            KvmUnavailable: the device cannot be opened.
            KvmUnsupported: the API version is not 12.
        """
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise KvmUnavailable(path, error) from error
        try:
            version = check_ioctl("KVM_GET_API_VERSION", fd, _abi.KVM_GET_API_VERSION)
            if version != _abi.KVM_API_VERSION:
                raise KvmUnsupported(
                    "KVM_API_VERSION 12", f"the kernel reports API version {version}"
                )
            caps = {
                name: max(0, _abi.ioctl_raw(fd, _abi.KVM_CHECK_EXTENSION, number)[0])
                for name, number in _abi.CAPABILITIES.items()
            }
        except BaseException:
            os.close(fd)
            raise
        return cls(fd=fd, api_version=version, capabilities=caps)

    def has(self, capability: str) -> bool:
        """Whether the capability (a ``KVM_CAP_*`` name) is present."""
        return self.capabilities.get(capability, 0) > 0

    def require(self, capability: str) -> int:
        """Return the capability's value; raise if the host lacks it.

        Raises:
            KvmUnsupported: naming the capability.
        """
        value = self.capabilities.get(capability, 0)
        if value <= 0:
            raise KvmUnsupported(capability)
        return value

    def require_all(self) -> None:
        """Check every capability in :data:`REQUIRED_CAPABILITIES`.

        Raises:
            KvmUnsupported: naming the first one missing.
        """
        for capability in REQUIRED_CAPABILITIES:
            self.require(capability)

    @property
    def max_vcpus(self) -> int:
        """The most vCPUs KVM allows per VM (``KVM_CAP_MAX_VCPUS``, else ``NR_VCPUS``)."""
        return self.capabilities.get("KVM_CAP_MAX_VCPUS", 0) or self.recommended_vcpus

    @property
    def recommended_vcpus(self) -> int:
        """KVM's recommended vCPU count per VM (``KVM_CAP_NR_VCPUS``, the host's CPUs)."""
        return self.capabilities.get("KVM_CAP_NR_VCPUS", 0) or 1

    @property
    def vcpu_mmap_size(self) -> int:
        """Size of each vCPU's shared ``kvm_run`` mapping."""
        return check_ioctl("KVM_GET_VCPU_MMAP_SIZE", self.fd, _abi.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """``KVM_GET_SUPPORTED_CPUID``: the CPUID entries KVM can expose to a guest."""
        if self._cpuid_cache is None:
            count = _CPUID_INITIAL_ENTRIES
            while True:
                buf = _abi.cpuid2_buffer(count)
                result, err = _abi.ioctl_raw(
                    self.fd, _abi.KVM_GET_SUPPORTED_CPUID, ctypes.addressof(buf)
                )
                if result >= 0:
                    break
                if err != errno.E2BIG or count >= _CPUID_MAX_ENTRIES:
                    raise KvmIoctlError("KVM_GET_SUPPORTED_CPUID", err)
                count *= 2
            entries = buf.entries[: buf.nent]
            self._cpuid_cache = [
                CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in entries
            ]
        return list(self._cpuid_cache)

    def msr_indices(self) -> tuple[int, ...]:
        """``KVM_GET_MSR_INDEX_LIST``: the MSRs whose state KVM saves and restores."""
        if self._msr_index_cache is None:
            probe = _abi.msr_list_buffer(0)
            result, err = _abi.ioctl_raw(
                self.fd, _abi.KVM_GET_MSR_INDEX_LIST, ctypes.addressof(probe)
            )
            if result < 0 and err != errno.E2BIG:
                raise KvmIoctlError("KVM_GET_MSR_INDEX_LIST", err)
            buf = _abi.msr_list_buffer(probe.nmsrs)
            check_ioctl(
                "KVM_GET_MSR_INDEX_LIST",
                self.fd,
                _abi.KVM_GET_MSR_INDEX_LIST,
                ctypes.addressof(buf),
            )
            count = buf.nmsrs
            self._msr_index_cache = tuple(buf.indices[:count])
        return self._msr_index_cache
