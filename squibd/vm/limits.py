"""Resource limits of the VM runtime: how many VMs, vCPUs and MiB of guest RAM it runs.

Theory of operation. Every VM costs host resources that one client could
otherwise exhaust for everybody: file descriptors (KVM, VM and one per
vCPU, memfds, a page-server session), threads (one per vCPU) and RAM. The
runtime admits a new VM (``vm.create``, ``snapshot.load``) only if

- the configured totals (:class:`RuntimeLimits`, config ``[limits]``) hold
  with it: ``max_vms``, ``max_vcpus_total``, ``max_guest_memory_mib``
  (default: the host's RAM). Refused with ``LimitReached`` (-32004);
- enough file descriptors are left under ``RLIMIT_NOFILE`` for it AND
  for ``fd_reserve`` more, kept for connections, snapshot files and page
  servers, so that the daemon keeps accepting clients once VMs used up the
  rest. Refused with ``ResourceExhausted`` (-32004), as is any
  EMFILE/ENFILE/ENOMEM met while building the VM.

:class:`Ledger` counts the registered VMs plus those being built
(reservations), so that concurrent creates cannot together overshoot.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from typing import Final

import attrs

from .errors import LimitReached, ResourceExhausted

__all__ = [
    "DEFAULT_FD_RESERVE",
    "DEFAULT_MAX_VCPUS_TOTAL",
    "DEFAULT_MAX_VMS",
    "Ledger",
    "Reservation",
    "RuntimeLimits",
    "check_fd_headroom",
    "fds_per_vm",
    "host_memory_mib",
]

_MIB: Final = 1024 * 1024
#: Default ``max_vms``: far above what one host runs with this daemon's
#: guests, far below the ~555 VMs that exhausted 20,000 fds (issue 10).
DEFAULT_MAX_VMS: Final = 128
#: Default ``max_vcpus_total``: one thread and one fd per vCPU.
DEFAULT_MAX_VCPUS_TOTAL: Final = 1024
#: File descriptors kept free for everything that is not a VM.
DEFAULT_FD_RESERVE: Final = 64
#: fds of a VM besides its vCPUs: /dev/kvm, the VM, two memfds, and a
#: page-server session (socket, userfaultfd, wake pipe), rounded up.
_FDS_PER_VM_BASE: Final = 8


def host_memory_mib() -> int:
    """The host's RAM in MiB (``SC_PHYS_PAGES`` x ``SC_PAGE_SIZE``)."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // _MIB


def fds_per_vm(vcpu_count: int, *, in_process: bool = True) -> int:
    """About how many file descriptors of the daemon a VM of ``vcpu_count`` vCPUs holds.

    A VM in its own VM process keeps its KVM and vCPU fds there: the daemon
    holds only its memory, its socket and its page-server session.
    """
    return _FDS_PER_VM_BASE + (vcpu_count if in_process else 0)


def _positive(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _not_negative(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


def _optional_positive(
    instance: object, attribute: attrs.Attribute[int | None], value: int | None
) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


@attrs.frozen
class RuntimeLimits:
    """The limits of one runtime (config ``[limits]``; see the module doc)."""

    max_vms: int = attrs.field(default=DEFAULT_MAX_VMS, validator=_positive)
    max_vcpus_total: int = attrs.field(default=DEFAULT_MAX_VCPUS_TOTAL, validator=_positive)
    #: None: the host's RAM (:func:`host_memory_mib`).
    max_guest_memory_mib: int | None = attrs.field(default=None, validator=_optional_positive)
    fd_reserve: int = attrs.field(default=DEFAULT_FD_RESERVE, validator=_not_negative)

    @property
    def guest_memory_mib(self) -> int:
        """``max_guest_memory_mib`` with its default applied."""
        if self.max_guest_memory_mib is not None:
            return self.max_guest_memory_mib
        return host_memory_mib()


@attrs.define(eq=False)
class Reservation:
    """A VM being built, counted until it is registered (or failed): :meth:`release`."""

    vcpus: int
    mem_mib: int
    _ledger: Ledger = attrs.field(repr=False)

    def release(self) -> None:
        """Stop counting it (idempotent)."""
        self._ledger.pending.discard(self)


@attrs.define(eq=False)
class Ledger:
    """Admission of new VMs against :class:`RuntimeLimits` (trio thread only)."""

    limits: RuntimeLimits
    pending: set[Reservation] = attrs.field(factory=set)

    def admit(
        self, vm_id: str, vcpus: int, mem_mib: int, existing: Iterable[tuple[int, int]]
    ) -> Reservation:
        """Reserve a VM of ``vcpus`` and ``mem_mib`` beside ``existing`` (vcpus, MiB) pairs.

        Raises:
            LimitReached: naming the first limit the VM would exceed.
        """
        counted = [*existing, *((r.vcpus, r.mem_mib) for r in self.pending)]
        limits = self.limits
        if len(counted) + 1 > limits.max_vms:
            raise LimitReached(
                vm_id, "max_vms", limits.max_vms, "VMs",
                f"{len(counted)} exist or are being created; destroy one first",
            )  # fmt: skip
        vcpus_used = sum(v for v, _ in counted)
        if vcpus_used + vcpus > limits.max_vcpus_total:
            raise LimitReached(
                vm_id, "max_vcpus_total", limits.max_vcpus_total, "vCPUs",
                f"{vcpus_used} are in use and this VM asks for {vcpus}",
            )  # fmt: skip
        mib_used = sum(m for _, m in counted)
        mib_limit = limits.guest_memory_mib
        if mib_used + mem_mib > mib_limit:
            raise LimitReached(
                vm_id, "max_guest_memory_mib", mib_limit, "MiB",
                f"{mib_used} MiB are in use and this VM asks for {mem_mib} MiB",
            )  # fmt: skip
        reservation = Reservation(vcpus, mem_mib, self)
        self.pending.add(reservation)
        return reservation


def _open_fds() -> int:
    # listdir holds one more fd (the directory) while it reads.
    return len(os.listdir("/proc/self/fd")) - 1


def check_fd_headroom(vm_id: str, vcpu_count: int, reserve: int, *, in_process: bool) -> None:
    """Refuse a VM that would leave fewer than ``reserve`` fds free. Blocking (reads /proc).

    Raises:
        ResourceExhausted: naming the numbers and what to do.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return
    try:
        used = _open_fds()
    except OSError as exc:
        raise ResourceExhausted(vm_id, "file descriptors", f"cannot count them: {exc}") from exc
    need = fds_per_vm(vcpu_count, in_process=in_process)
    if used + need + reserve > soft:
        raise ResourceExhausted(
            vm_id,
            "file descriptors",
            f"{used} of the {soft} allowed (RLIMIT_NOFILE) are open, this VM needs about "
            f"{need} and {reserve} stay reserved for connections and snapshots; destroy "
            "VMs or raise the limit (LimitNOFILE= of the service)",
        )
