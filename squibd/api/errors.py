"""Map exceptions raised by handlers to JSON-RPC error objects.

* every :class:`~squibd.snapshot.errors.SnapshotError` -> -32001, with
  ``data: {"kind", "fault_message"}`` carrying SPEC section 2's message;
* VM runtime errors -> -32002 (unknown VM), -32003 (wrong state, and the
  other "not in this state" refusals), -32004 (busy);
* refusals of the daemon itself -> -32005 (:class:`NotAllowed`);
* anything else -> -32603, with the exception logged by the server.
"""

from __future__ import annotations

from typing import Final

from squibd.rpc import (
    BUSY,
    CANCELLED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    NOT_ALLOWED,
    SNAPSHOT_ERROR,
    UNKNOWN_VM,
    WRONG_VM_STATE,
    RpcError,
    application_error,
)
from squibd.snapshot.errors import SnapshotError

__all__ = [
    "CANCELLED_KIND",
    "NotAllowed",
    "cancelled_error",
    "internal_error",
    "map_exception",
    "not_allowed",
]

#: ``data.kind`` of the error answered to a request cancelled by ``$/cancelRequest``.
CANCELLED_KIND: Final = "Cancelled"

# VM runtime error kinds (squibd.vm.errors) -> JSON-RPC code. Kinds not listed
# here are "the VM cannot do that now" refusals: -32003.
_VM_KIND_CODES: Final = {
    "UnknownVm": UNKNOWN_VM,
    "WrongVmState": WRONG_VM_STATE,
    "Busy": BUSY,
    "InvalidVmConfig": INVALID_PARAMS,
    "PairMismatch": SNAPSHOT_ERROR,
    # Issue 10: limits and host resources refuse a VM for now (retry later).
    "LimitReached": BUSY,
    "ResourceExhausted": BUSY,
    "GuestMemoryUnavailable": BUSY,
}


class NotAllowed(Exception):
    """The daemon refuses the call (debug-only method, path outside allowed roots, ...)."""

    kind: Final = "NotAllowed"


def not_allowed(message: str) -> RpcError:
    """-32005 with ``data.kind`` ``NotAllowed``."""
    return application_error(NOT_ALLOWED, NotAllowed.kind, message)


def cancelled_error(request_id: object) -> RpcError:
    """-32800: the request was cancelled by ``$/cancelRequest`` and rolled back."""
    message = f"request {request_id!r} was cancelled; nothing was committed"
    return application_error(CANCELLED, CANCELLED_KIND, message)


def _vm_error_code(exc: Exception) -> int | None:
    from squibd.vm.errors import VmError  # the runtime is optional at import time

    if not isinstance(exc, VmError):
        return None
    return _VM_KIND_CODES.get(exc.kind, WRONG_VM_STATE)


def map_exception(exc: Exception) -> RpcError | None:
    """The wire error for ``exc``, or ``None`` when it is unexpected (a bug: -32603)."""
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, SnapshotError):
        return application_error(SNAPSHOT_ERROR, exc.kind, exc.wire_message())
    if isinstance(exc, NotAllowed):
        return not_allowed(str(exc))
    try:
        from squibd.vm.memory import GuestAddressError

        if isinstance(exc, GuestAddressError):  # vm.read_memory/write_memory range
            return application_error(INVALID_PARAMS, "GuestAddressError", str(exc))
        code = _vm_error_code(exc)
    except ImportError:
        code = None
    if code is not None:
        kind = getattr(exc, "kind", type(exc).__name__)
        return application_error(code, str(kind), str(exc))
    return None


def internal_error(exc: BaseException) -> RpcError:
    """-32603 for an unexpected exception (the message names its type only)."""
    return RpcError(INTERNAL_ERROR, f"Internal error: {type(exc).__name__}: {exc}")
