"""Map exceptions raised by handlers to JSON-RPC error objects.

Every error squibd raises reaches the client as a typed application error,
``data: {"kind", "fault_message"}``; only a bug is -32603, and its message
never names a Python class (it carries an incident id the daemon log repeats
next to the traceback).

The mapping is decided per class (:func:`wire_mapping`), first rule wins:

1. a class attribute ``rpc_code`` (an ``int``) anywhere in the MRO: that code,
   with ``kind`` from the class's ``kind`` attribute or its name. New error
   classes opt in with one line and need no edit here;
2. :class:`~squibd.snapshot.errors.SnapshotError` -> -32001 with SPEC
   section 2's kind and message;
3. VM runtime errors by ``kind``: -32002 (unknown VM), -32004 (busy), -32602
   (bad config), -32001 (pair mismatch), every other kind -32003;
4. :class:`NotAllowed` -> -32005;
5. registered bases: lazy-restore errors (``UffdError``: page server
   unavailable, handshake failed ...) -> -32001, since they fail a load;
   wire type/value errors, guest-address and layout errors, bad vCPU counts
   and guest programs -> -32602; the other KVM errors -> -32003 (this host cannot do it now);
6. ``OSError`` by errno: out of fds, memory, buffers or space (EMFILE,
   ENFILE, ENOMEM, ENOBUFS, EAGAIN, ENOSPC, EDQUOT) -> -32004 kind
   ``ResourceExhausted``; EACCES/EPERM -> -32005 kind ``PermissionDenied``;
   any other errno -> -32003 kind ``OsError``; ``MemoryError`` -> -32004
   ``ResourceExhausted``;
7. any other exception class defined in a ``squibd`` module: by package
   (``squibd.snapshot``, ``squibd.uffd``, ``squibd.store`` -> -32001; every
   other package -> -32003), kind = its ``kind`` attribute or class name.

Anything else (``KeyError``, ``AssertionError`` ... from the standard library
or a dependency) is a bug: -32603.

An instance whose ``errno`` attribute is a resource errno (a ``KvmIoctlError``
of ``KVM_CREATE_VCPU`` failing with EMFILE, say) is answered -32004
``ResourceExhausted`` whatever its class maps to, except snapshot errors,
whose kinds are the contract of SPEC section 2.
"""

from __future__ import annotations

import errno
import functools
import logging
import secrets
from typing import Final

import attrs

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
from squibd.snapshot.errors import SnapshotError, format_os_error, quote_path

__all__ = [
    "CANCELLED_KIND",
    "OS_ERROR_KIND",
    "PERMISSION_DENIED_KIND",
    "RESOURCE_EXHAUSTED_KIND",
    "NotAllowed",
    "WireMapping",
    "cancelled_error",
    "internal_error",
    "map_exception",
    "not_allowed",
    "wire_mapping",
]

log = logging.getLogger("squibd.api")

#: ``data.kind`` of the error answered to a request cancelled by ``$/cancelRequest``.
CANCELLED_KIND: Final = "Cancelled"
#: ``data.kind`` when the host ran out of fds, memory, buffers or disk space.
RESOURCE_EXHAUSTED_KIND: Final = "ResourceExhausted"
#: ``data.kind`` of an EACCES/EPERM that is not a snapshot error.
PERMISSION_DENIED_KIND: Final = "PermissionDenied"
#: ``data.kind`` of any other OS error that is not a snapshot error.
OS_ERROR_KIND: Final = "OsError"

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

_RESOURCE_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.ENOSPC,
     errno.EDQUOT}
)  # fmt: skip
_PERMISSION_ERRNOS: Final = frozenset({errno.EACCES, errno.EPERM})

# Rule 7: the code of a squibd error class no other rule covers, by package.
_PACKAGE_CODES: Final = {
    "squibd.snapshot": SNAPSHOT_ERROR,
    "squibd.uffd": SNAPSHOT_ERROR,
    "squibd.store": SNAPSHOT_ERROR,
}
_DEFAULT_CODE: Final = WRONG_VM_STATE


class NotAllowed(Exception):
    """The daemon refuses the call (debug-only method, path outside allowed roots, ...)."""

    kind: Final = "NotAllowed"


@attrs.frozen
class WireMapping:
    """How an error class is answered: the JSON-RPC code and ``data.kind``."""

    code: int
    kind: str


def not_allowed(message: str) -> RpcError:
    """-32005 with ``data.kind`` ``NotAllowed``."""
    return application_error(NOT_ALLOWED, NotAllowed.kind, message)


def cancelled_error(request_id: object) -> RpcError:
    """-32800: the request was cancelled by ``$/cancelRequest`` and rolled back."""
    message = f"request {request_id!r} was cancelled; nothing was committed"
    return application_error(CANCELLED, CANCELLED_KIND, message)


def _kind(cls: type[BaseException]) -> str:
    kind = getattr(cls, "kind", None)
    return kind if isinstance(kind, str) and kind else cls.__name__


@functools.cache
def _registered_bases() -> tuple[tuple[type[BaseException], int], ...]:
    # Rule 5, most specific first. Imported lazily: the runtime parts are optional here.
    from .wire import FieldValueError, WireTypeError

    bases: list[tuple[type[BaseException], int]] = [
        (FieldValueError, INVALID_PARAMS),
        (WireTypeError, INVALID_PARAMS),
    ]
    try:
        from squibd.vm.memory import GuestAddressError, MemoryLayoutError

        bases += [(GuestAddressError, INVALID_PARAMS), (MemoryLayoutError, INVALID_PARAMS)]
    except ImportError:  # pragma: no cover - the VM runtime is always installed
        pass
    try:
        from squibd.kvm.errors import GuestProgramError, KvmError, VcpuLimitExceeded

        bases += [
            (VcpuLimitExceeded, INVALID_PARAMS),
            (GuestProgramError, INVALID_PARAMS),
            (KvmError, WRONG_VM_STATE),
        ]
    except ImportError:  # pragma: no cover
        pass
    try:
        from squibd.uffd.errors import UffdError

        bases.append((UffdError, SNAPSHOT_ERROR))
    except ImportError:  # pragma: no cover
        pass
    return tuple(bases)


def _vm_error_code(cls: type[BaseException]) -> int | None:
    try:
        from squibd.vm.errors import VmError
    except ImportError:  # pragma: no cover - the runtime is optional at import time
        return None
    if not issubclass(cls, VmError):
        return None
    return _VM_KIND_CODES.get(cls.kind, WRONG_VM_STATE)


def wire_mapping(cls: type[BaseException]) -> WireMapping | None:
    """The code and kind answering an exception of class ``cls`` (rules 1-7 above).

    ``None`` means the class is not one of squibd's errors: raised, it is a bug (-32603).
    For ``OSError`` the class-level answer is the generic one; :func:`map_exception`
    refines it by the instance's errno.
    """
    explicit = getattr(cls, "rpc_code", None)
    if isinstance(explicit, int) and not isinstance(explicit, bool):
        return WireMapping(explicit, _kind(cls))
    if issubclass(cls, SnapshotError):
        return WireMapping(SNAPSHOT_ERROR, cls.kind)
    vm_code = _vm_error_code(cls)
    if vm_code is not None:
        return WireMapping(vm_code, _kind(cls))
    if issubclass(cls, NotAllowed):
        return WireMapping(NOT_ALLOWED, NotAllowed.kind)
    for base, code in _registered_bases():
        if issubclass(cls, base):
            return WireMapping(code, _kind(cls))
    if issubclass(cls, MemoryError):
        return WireMapping(BUSY, RESOURCE_EXHAUSTED_KIND)
    if issubclass(cls, PermissionError):
        return WireMapping(NOT_ALLOWED, PERMISSION_DENIED_KIND)
    if issubclass(cls, OSError):
        return WireMapping(WRONG_VM_STATE, OS_ERROR_KIND)
    module = getattr(cls, "__module__", "") or ""
    if module == "squibd" or module.startswith("squibd."):
        package = ".".join(module.split(".")[:2])
        return WireMapping(_PACKAGE_CODES.get(package, _DEFAULT_CODE), _kind(cls))
    return None


def _os_error_message(exc: OSError) -> str:
    text = format_os_error(exc)
    filename = getattr(exc, "filename", None)
    if isinstance(filename, str | bytes):
        text = f"{text}: {quote_path(filename)}"
    return text


def _resource_message(exc: BaseException, text: str) -> str:
    if isinstance(exc, MemoryError):
        return "squibd ran out of memory; free some (destroy VMs) and retry"
    return (
        f"squibd ran out of a host resource ({text}); "
        "retry after releasing some (destroy VMs, close connections) or raise the limit"
    )


def map_exception(exc: BaseException) -> RpcError | None:
    """The wire error for ``exc``, or ``None`` when it is unexpected (a bug: -32603)."""
    if isinstance(exc, RpcError):
        return exc
    mapping = wire_mapping(type(exc))
    if mapping is None:
        return None
    foreign_os_error = isinstance(exc, OSError) and not type(exc).__module__.startswith("squibd")
    text = _os_error_message(exc) if isinstance(exc, OSError) and foreign_os_error else str(exc)
    if not text:
        text = mapping.kind
    explicit = isinstance(getattr(type(exc), "rpc_code", None), int)
    code = getattr(exc, "errno", None)
    if isinstance(exc, MemoryError) or (
        code in _RESOURCE_ERRNOS and not explicit and not isinstance(exc, SnapshotError)
    ):
        return application_error(BUSY, RESOURCE_EXHAUSTED_KIND, _resource_message(exc, text))
    if foreign_os_error:
        kind = PERMISSION_DENIED_KIND if code in _PERMISSION_ERRNOS else mapping.kind
        code_out = NOT_ALLOWED if code in _PERMISSION_ERRNOS else mapping.code
        return application_error(code_out, kind, text)
    return application_error(mapping.code, mapping.kind, text)


def internal_error(exc: BaseException | None = None) -> RpcError:
    """-32603 for an unexpected exception.

    The message names no Python class and shows nothing of the exception: it
    carries an incident id, which the caller logs next to the traceback.
    """
    incident = secrets.token_hex(4)
    message = (
        f"Internal error: squibd hit an unexpected failure (incident {incident}); "
        "the daemon log has the details"
    )
    return RpcError(INTERNAL_ERROR, message, {"incident": incident})
