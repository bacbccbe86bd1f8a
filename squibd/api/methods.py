"""The method table and the dispatcher.

Each :class:`MethodSpec` names a method, its params and result models, its
handler and how it may be called. :func:`dispatch` is the one entry point
the server uses: look up, check permission, structure params strictly,
call, unstructure the result; every failure becomes an
:class:`~squibd.rpc.RpcError`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs

from squibd.rpc import (
    BUSY,
    METHOD_NOT_FOUND,
    NOT_ALLOWED,
    SNAPSHOT_ERROR,
    UNKNOWN_VM,
    WRONG_VM_STATE,
    RpcError,
)

from . import handlers as h
from . import models as m
from . import ops
from .context import ApiContext, CallInfo
from .errors import internal_error, map_exception, not_allowed
from .wire import structure_params, unstructure_result

__all__ = [
    "METHODS",
    "READ_ONLY_METHODS",
    "MethodSpec",
    "UnexpectedHandlerError",
    "dispatch",
    "lookup",
]

Handler = Callable[[ApiContext, CallInfo, Any], Awaitable[Any]]

_VM_ERRORS: Final = (UNKNOWN_VM, WRONG_VM_STATE, BUSY)


@attrs.frozen
class MethodSpec:
    """One JSON-RPC method.

    Attributes:
        name: ``<area>.<verb>``.
        summary: one line for ``protocol/openrpc.json`` and ``squibctl --help``.
        params, result: the attrs models (``result`` may be ``dict`` for free-form).
        handler: ``async (api, call, params) -> result``.
        long_running: accepts ``progress_token`` and ``$/cancelRequest``.
        debug_only: only with ``squibd --debug-api`` (else -32005).
        inline: no I/O and no waiting: the server answers it on the connection's
            reader task instead of starting a task (cheap status queries).
        errors: application error codes it may answer.
        read_only: cheap and changes nothing: the server logs its calls at DEBUG
            level (a client polling it must not flood the log), the others at INFO.
    """

    name: str
    summary: str
    params: type
    result: type
    handler: Handler
    long_running: bool = False
    debug_only: bool = False
    inline: bool = False
    errors: tuple[int, ...] = ()
    read_only: bool = False


def _spec(*args: Any, **kwargs: Any) -> tuple[str, MethodSpec]:
    spec = MethodSpec(*args, **kwargs)
    return spec.name, spec


#: Every method, in documentation order.
METHODS: Final[dict[str, MethodSpec]] = dict(
    [
        _spec("daemon.status", "Version, pid, uptime, VM count and KVM availability.",
              m.EmptyParams, m.StatusResult, h.daemon_status, inline=True),
        _spec("vm.create", "Create a NotStarted VM running a built-in guest program.",
              m.VmCreateParams, m.VmInfo, h.vm_create, errors=(WRONG_VM_STATE,)),
        _spec("vm.start", "Start a NotStarted VM.", m.VmIdParams, m.VmInfo, h.vm_start,
              errors=_VM_ERRORS),
        _spec("vm.pause", "Pause a Running VM (quiesce every vCPU).", m.VmIdParams, m.VmInfo,
              h.vm_pause, errors=(*_VM_ERRORS, SNAPSHOT_ERROR)),
        _spec("vm.resume", "Resume a Paused VM.", m.VmIdParams, m.VmInfo, h.vm_resume,
              errors=_VM_ERRORS),
        _spec("vm.describe", "State, sizes and per-vCPU guest progress of a VM.",
              m.VmIdParams, m.VmInfo, h.vm_describe, inline=True, errors=(UNKNOWN_VM,)),
        _spec("vm.list", "Every VM.", m.EmptyParams, m.VmListResult, h.vm_list, inline=True),
        _spec("vm.destroy", "Stop a VM and release its memory.", m.VmIdParams,
              m.DestroyResult, h.vm_destroy, errors=(UNKNOWN_VM, BUSY)),
        _spec("snapshot.create",
              "Save a VM as a Full or Diff snapshot pair; a Running VM is resumed after.",
              m.SnapshotCreateParams, m.SnapshotCreateResult, h.snapshot_create,
              long_running=True, errors=(SNAPSHOT_ERROR, *_VM_ERRORS)),
        _spec("snapshot.load",
              "Create a VM (or fill a NotStarted one) from a snapshot pair.",
              m.SnapshotLoadParams, m.SnapshotLoadResult, h.snapshot_load,
              long_running=True, errors=(SNAPSHOT_ERROR, *_VM_ERRORS)),
        _spec("snapshot.describe", "Describe a state file; optionally verify its memory file.",
              m.SnapshotDescribeParams, dict, h.snapshot_describe, errors=(SNAPSHOT_ERROR,)),
        _spec("snapshot.rebase", "Merge a Diff snapshot onto its Full base into a new Full pair.",
              m.RebaseParams, m.RebaseResult, h.snapshot_rebase, long_running=True,
              errors=(SNAPSHOT_ERROR,)),
        _spec("vm.read_memory", "Read guest RAM (debug API).", m.ReadMemoryParams,
              m.ReadMemoryResult, h.vm_read_memory, debug_only=True,
              errors=(UNKNOWN_VM, NOT_ALLOWED)),
        _spec("vm.write_memory", "Write guest RAM, marking the pages dirty (debug API).",
              m.WriteMemoryParams, m.WriteMemoryResult, h.vm_write_memory, debug_only=True,
              errors=(UNKNOWN_VM, NOT_ALLOWED)),
        _spec("snapshot.list", "List the snapshot pairs under the allowed roots, with metadata.",
              ops.SnapshotListParams, ops.SnapshotListResult, ops.snapshot_list,
              errors=(SNAPSHOT_ERROR, NOT_ALLOWED)),
        _spec("snapshot.delete", "Delete a snapshot pair crash-safely (refused while a Diff "
              "depends on it, unless force).", ops.SnapshotDeleteParams,
              ops.SnapshotDeleteResult, ops.snapshot_delete, errors=(SNAPSHOT_ERROR,)),
    ]
)  # fmt: skip

#: The cheap read-only methods (issue 10: logged at DEBUG level, one line per request).
READ_ONLY_METHODS: Final = ("daemon.status", "vm.describe", "vm.list", "snapshot.describe")
for _name in READ_ONLY_METHODS:
    METHODS[_name] = attrs.evolve(METHODS[_name], read_only=True)


def _register_store_methods() -> None:
    """``store.*`` (issue 12), from squibd.api.store_handlers."""
    from .store_handlers import STORE_METHODS

    for name, summary, params, result, handler, long_running in STORE_METHODS:
        METHODS[name] = MethodSpec(name, summary, params, result, handler,
                                   long_running=long_running, errors=(SNAPSHOT_ERROR,))


_register_store_methods()


class UnexpectedHandlerError(Exception):
    """A handler raised an exception no error mapping knows: a bug, answered -32603.

    ``rpc_error`` is the answer; ``__cause__`` is the original exception (for the log).
    """

    def __init__(self, rpc_error: RpcError) -> None:
        super().__init__(str(rpc_error))
        self.rpc_error = rpc_error


def lookup(api: ApiContext, method: str) -> MethodSpec:
    """The spec of ``method``.

    Raises:
        RpcError: -32601 for an unknown method, -32005 for a debug-only one
        without ``--debug-api``.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")
    if spec.debug_only and not api.debug_api:
        raise not_allowed(f"{method} is only available when squibd runs with --debug-api")
    return spec


async def dispatch(api: ApiContext, call: CallInfo, method: str, params: Any) -> Any:
    """Run one call (counted and timed when metrics are on; see :func:`_dispatch`)."""
    if api.metrics is not None:
        return await api.metrics.timed(api, method, _dispatch(api, call, method, params))
    return await _dispatch(api, call, method, params)


async def _dispatch(api: ApiContext, call: CallInfo, method: str, params: Any) -> Any:
    """Run one call and return its JSON-ready result.

    Raises:
        RpcError: the error to answer (known failure).
        UnexpectedHandlerError: an unmapped exception (answered -32603, logged).
        trio.Cancelled: the call was cancelled; the caller answers it.
    """
    spec = lookup(api, method)
    try:
        model: Any = structure_params(api.converter, params, spec.params)
        result = await spec.handler(api, call, model)
    except Exception as exc:
        mapped = map_exception(exc)
        if mapped is None:
            raise UnexpectedHandlerError(internal_error(exc)) from exc
        raise mapped from exc
    if spec.result is dict:
        return result
    return unstructure_result(api.converter, result)

