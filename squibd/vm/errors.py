"""Errors of the VM runtime: one class per cause, each message naming the VM.

These are the daemon's own errors of SPEC section 2 ("unknown VM, wrong VM
state, busy ..."): clear sentences that say which VM, in which state, and
what to do. Snapshot failures proper (QuiesceTimeout, MemoryIo, ...) keep
their wire-stable kinds from ``squibd.snapshot.errors`` and are raised as
those.
"""

from __future__ import annotations

import errno
from typing import ClassVar, Final

__all__ = [
    "Busy",
    "DiffNotAllowed",
    "DuplicateVm",
    "GuestMemoryUnavailable",
    "InvalidVmConfig",
    "LimitReached",
    "NoParentCheckpoint",
    "PairMismatch",
    "ResourceExhausted",
    "UnknownVm",
    "VmError",
    "VmFailed",
    "WrongVmState",
]


class VmError(Exception):
    """Base of every VM runtime error; ``kind`` is a stable name for the wire."""

    kind: ClassVar[str] = "VmError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnknownVm(VmError):
    """Raised when no VM with the given id exists in the registry."""

    kind = "UnknownVm"

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        super().__init__(f"VM {vm_id!r} does not exist; create it with vm.create first.")


class DuplicateVm(VmError):
    """Raised when creating a VM whose id is already registered."""

    kind = "DuplicateVm"

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        super().__init__(
            f"VM {vm_id!r} already exists; destroy it first or choose another vm_id."
        )


class WrongVmState(VmError):
    """Raised when an operation is not allowed in the VM's current lifecycle state."""

    kind = "WrongVmState"

    def __init__(self, vm_id: str, state: str, op: str) -> None:
        self.vm_id = vm_id
        self.state = state
        self.op = op
        super().__init__(f"Cannot {op} VM {vm_id!r} while it is {state}.")


class Busy(VmError):
    """Raised when another long operation (a save or a load) of the VM is running."""

    kind = "Busy"

    def __init__(self, vm_id: str, op: str) -> None:
        self.vm_id = vm_id
        self.op = op
        super().__init__(
            f"VM {vm_id!r} is busy with a {op} in progress; retry when it has finished."
        )


class DiffNotAllowed(VmError):
    """Raised for a Diff snapshot request on a VM without dirty page tracking."""

    kind = "DiffNotAllowed"
    MESSAGE: ClassVar[str] = (
        "Diff snapshots are not allowed on uVMs with dirty page tracking disabled."
    )

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        # The message is fixed by SPEC section 2 (scripts match on it).
        super().__init__(self.MESSAGE)


class InvalidVmConfig(VmError):
    """Raised when a VM configuration (vCPU count, memory size, guest) is not usable."""

    kind = "InvalidVmConfig"

    def __init__(self, vm_id: str, reason: str) -> None:
        self.vm_id = vm_id
        self.reason = reason
        super().__init__(f"Cannot create VM {vm_id!r}: {reason}.")


class VmFailed(VmError):
    """Raised when an operation needs a healthy VM but the VM is in the error state."""

    kind = "VmFailed"

    def __init__(self, vm_id: str, op: str, error: str) -> None:
        self.vm_id = vm_id
        self.op = op
        self.error = error
        super().__init__(
            f"Cannot {op} VM {vm_id!r}: it is in the error state ({error}); destroy it."
        )


class PairMismatch(VmError):
    """Raised when a state file and a memory file do not belong together."""

    kind = "PairMismatch"

    def __init__(self, vm_id: str, reason: str) -> None:
        self.vm_id = vm_id
        self.reason = reason
        super().__init__(
            f"Cannot load VM {vm_id!r}: the memory file does not match the state file "
            f"({reason})."
        )


class NoParentCheckpoint(VmError):
    """Raised for a Diff request on a VM that has no checkpoint to be a Diff of."""

    kind = "NoParentCheckpoint"

    def __init__(self, vm_id: str) -> None:
        self.vm_id = vm_id
        super().__init__(
            f"VM {vm_id!r} has no checkpoint yet, so a Diff has no parent; "
            "take a Full snapshot first (or load one)."
        )


class LimitReached(VmError):
    """Raised when a new VM would exceed a configured limit of the daemon (``[limits]``).

    ``limit`` names the config key (``max_vms``, ``max_vcpus_total``,
    ``max_guest_memory_mib``). Answered -32004 (busy): retry once VMs were destroyed.
    """

    kind = "LimitReached"

    def __init__(self, vm_id: str, limit: str, value: int, unit: str, detail: str) -> None:
        self.vm_id = vm_id
        self.limit = limit
        self.value = value
        super().__init__(
            f"Cannot create VM {vm_id!r}: {limit} limit reached ({value} {unit}); {detail}."
        )


#: errno values that mean "the host ran out of a resource" (fds, kernel memory).
EXHAUSTION_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class ResourceExhausted(VmError):
    """Raised when the host or the daemon ran out of file descriptors or memory for a VM.

    Nothing of the VM is left behind; the daemon keeps serving. Answered
    -32004 (busy): retry once VMs were destroyed, or raise the limit
    (``LimitNOFILE=`` of the service) / free memory.
    """

    kind = "ResourceExhausted"

    def __init__(self, vm_id: str, resource: str, detail: str) -> None:
        self.vm_id = vm_id
        self.resource = resource
        super().__init__(f"Cannot create VM {vm_id!r}: out of {resource} ({detail}).")

    @classmethod
    def from_error(cls, vm_id: str, error: BaseException) -> ResourceExhausted | None:
        """The typed error for an EMFILE/ENFILE/ENOMEM anywhere in ``error``'s chain, else None."""
        seen: BaseException | None = error
        depth = 0
        while seen is not None and depth < 8:
            code = getattr(seen, "errno", None)
            if code in EXHAUSTION_ERRNOS:
                resource = "memory" if code == errno.ENOMEM else "file descriptors"
                return cls(vm_id, resource, f"{errno.errorcode[code]}: {seen}")
            seen = seen.__cause__ or seen.__context__
            depth += 1
        return None


class GuestMemoryUnavailable(VmError):
    """Raised when guest memory did not answer in time (a lazy VM whose page server stalls).

    The access keeps waiting in a worker thread (at most one per VM) and
    ends when the page server serves the page or the VM is destroyed.
    """

    kind = "GuestMemoryUnavailable"

    def __init__(self, vm_id: str, timeout_s: float) -> None:
        self.vm_id = vm_id
        self.timeout_s = timeout_s
        super().__init__(
            f"The memory of VM {vm_id!r} did not answer within {timeout_s:g} s "
            "(its page server does not serve the page); retry later or destroy the VM."
        )
