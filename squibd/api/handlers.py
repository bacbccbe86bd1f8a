"""The handlers: one coroutine per method, from params model to result model.

Handlers call the VM runtime (``squibd.vm``) and the synchronous snapshot
tools (``squibd.snapshot``, run in worker threads). They raise the errors of
those packages unchanged; :mod:`squibd.api.errors` maps them to the wire.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from typing import Any, Final

import trio

import squibd
from squibd.rpc import RpcError
from squibd.snapshot.describe import default_memory_path, describe_snapshot
from squibd.snapshot.paths import validate_path
from squibd.snapshot.rebase import rebase
from squibd.vm import run_cancellable
from squibd.vm.models import VmDescription

from .context import ApiContext, CallInfo
from .errors import not_allowed
from .models import (
    MAX_WRITE_MEMORY,
    DestroyResult,
    EmptyParams,
    ReadMemoryParams,
    ReadMemoryResult,
    RebaseParams,
    RebaseResult,
    SnapshotCreateParams,
    SnapshotCreateResult,
    SnapshotDescribeParams,
    SnapshotLoadParams,
    SnapshotLoadResult,
    StatusResult,
    VmCreateParams,
    VmIdParams,
    VmInfo,
    VmListResult,
    WriteMemoryParams,
    WriteMemoryResult,
)
from .ops import snapshot_metadata

__all__ = [
    "daemon_status",
    "snapshot_create",
    "snapshot_describe",
    "snapshot_load",
    "snapshot_rebase",
    "vm_create",
    "vm_describe",
    "vm_destroy",
    "vm_list",
    "vm_pause",
    "vm_read_memory",
    "vm_resume",
    "vm_start",
    "vm_write_memory",
]

_MS_PER_S: Final = 1000.0
#: Bytes per MiB (mem_size_mib is in MiB).
_MIB: Final = 1024 * 1024


def _path(api: ApiContext, path: str, what: str, *, socket: bool = False) -> str:
    return validate_path(path, what=what, socket=socket, allowed_roots=api.allowed_roots)


def _to_info(api: ApiContext, d: VmDescription) -> VmInfo:
    state = d.state if d.state in ("NotStarted", "Running", "Paused") else "Paused"
    return VmInfo(
        vm_id=d.vm_id,
        state=state,  # type: ignore[arg-type]
        vcpu_count=d.vcpu_count,
        mem_size_mib=d.mem_size_mib,
        track_dirty_pages=d.track_dirty_pages,
        guest_progress=None if d.guest_progress is None else list(d.guest_progress),
        guest_program=d.guest_program,
        error=d.error,
        guest_progress_stale=d.guest_progress_stale,
        restored_from=api.restored_from.get(d.vm_id),
        process_id=d.process_id,
        memory_layout=d.memory_layout,
        api_socket=None if api.api_sockets is None else api.api_sockets.path_of(d.vm_id),
    )


async def _info(api: ApiContext, vm_id: str) -> VmInfo:
    """The VM as ``vm.describe`` reports it; guest memory is read off the trio thread, bounded."""
    return _to_info(api, await api.runtime.describe_current(vm_id))


async def daemon_status(api: ApiContext, call: CallInfo, params: EmptyParams) -> StatusResult:
    """Version, pid, uptime, VM count and KVM availability."""
    return StatusResult(
        version=squibd.__version__,
        pid=os.getpid(),
        uptime_s=round(time.monotonic() - api.started_at, 3),
        vm_count=api.vm_count,
        kvm_available=api.kvm_available(),
        debug_api=api.debug_api,
    )


async def vm_create(api: ApiContext, call: CallInfo, params: VmCreateParams) -> VmInfo:
    """Create a NotStarted VM running a built-in guest (and its Firecracker API socket)."""
    from squibd.vm.models import GuestSpec

    socket_path = None
    if params.api_socket is not None:
        socket_path = _path(api, params.api_socket, "api_socket", socket=True)
        if api.api_sockets is None:
            raise not_allowed("api_socket: this squibd serves no Firecracker API sockets")
    guest = GuestSpec(program=params.guest.program, params=dict(params.guest.params))
    await api.runtime.create_vm(
        params.vm_id, params.vcpu_count, params.mem_size_mib, params.track_dirty_pages, guest,
        memory_layout=params.memory_layout,
    )  # fmt: skip
    if socket_path is not None and api.api_sockets is not None:
        await _open_api_socket(api, params.vm_id, socket_path)
    return await _info(api, params.vm_id)


async def _open_api_socket(api: ApiContext, vm_id: str, path: str) -> None:
    # The VM exists already; a socket that cannot be served undoes its creation.
    assert api.api_sockets is not None
    try:
        await api.api_sockets.open_api_socket(vm_id, path)
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await api.runtime.destroy(vm_id)
        if isinstance(exc, Exception) and not isinstance(exc, RpcError):
            raise RpcError.invalid_params(f"params.api_socket: {exc}") from exc
        raise


async def vm_start(api: ApiContext, call: CallInfo, params: VmIdParams) -> VmInfo:
    """Start a NotStarted VM's vCPUs."""
    await api.runtime.start(params.vm_id)
    return await _info(api, params.vm_id)


async def vm_pause(api: ApiContext, call: CallInfo, params: VmIdParams) -> VmInfo:
    """Pause a Running VM (quiesce)."""
    await api.runtime.pause(params.vm_id)
    return await _info(api, params.vm_id)


async def vm_resume(api: ApiContext, call: CallInfo, params: VmIdParams) -> VmInfo:
    """Resume a Paused VM."""
    await api.runtime.resume(params.vm_id)
    return await _info(api, params.vm_id)


async def vm_destroy(api: ApiContext, call: CallInfo, params: VmIdParams) -> DestroyResult:
    """Stop a VM and release it."""
    await api.runtime.destroy(params.vm_id)
    if api.api_sockets is not None:
        await api.api_sockets.close_api_socket(params.vm_id)
    return DestroyResult(vm_id=params.vm_id, destroyed=True)


async def vm_describe(api: ApiContext, call: CallInfo, params: VmIdParams) -> VmInfo:
    """State, sizes and guest progress of one VM."""
    return await _info(api, params.vm_id)


async def vm_list(api: ApiContext, call: CallInfo, params: EmptyParams) -> VmListResult:
    """Every VM, sorted by id."""
    if api.vm_count == 0:
        return VmListResult(vms=[])
    descriptions = await api.runtime.describe_many(api.runtime.list())
    return VmListResult(vms=[_to_info(api, d) for d in descriptions])


async def snapshot_create(
    api: ApiContext, call: CallInfo, params: SnapshotCreateParams
) -> SnapshotCreateResult:
    """Save a VM as a Full or Diff pair; a Running VM is resumed afterwards."""
    snap = _path(api, params.snapshot_path, "snapshot_path")
    mem = _path(api, params.mem_file_path, "mem_file_path")
    result = await api.runtime.save(
        params.vm_id,
        params.snapshot_type,
        snap,
        mem,
        live=params.live,
        progress=call.progress,
        metadata=snapshot_metadata(params.vm_id, params.labels),
    )
    return SnapshotCreateResult(
        snapshot_type=result.snapshot_type,
        snapshot_path=result.snapshot_path,
        mem_file_path=result.mem_file_path,
        pair_id=result.pair_id,
        bytes_written=result.bytes_written,
        pages_written=result.pages_written,
        passes=result.passes,
        pause_ms=round(result.pause_ms, 3),
        duration_ms=round(result.duration_ms, 3),
    )


async def snapshot_load(
    api: ApiContext, call: CallInfo, params: SnapshotLoadParams
) -> SnapshotLoadResult:
    """Create (or fill a NotStarted) VM from a snapshot pair."""
    from squibd.vm.models import MemBackend

    if (params.mem_backend is None) == (params.mem_file_path is None):
        raise RpcError.invalid_params(
            "params: give exactly one of mem_backend and mem_file_path"
        )
    if params.mem_backend is not None:
        is_socket = params.mem_backend.backend_type == "Uffd"
        backend = MemBackend(
            params.mem_backend.backend_type,
            _path(api, params.mem_backend.backend_path, "backend_path", socket=is_socket),
        )
    else:
        assert params.mem_file_path is not None
        backend = MemBackend("File", _path(api, params.mem_file_path, "mem_file_path"))
    snap = _path(api, params.snapshot_path, "snapshot_path")
    started = time.monotonic()
    vm = await api.runtime.load(
        params.vm_id,
        snap,
        backend,
        track_dirty_pages=params.track_dirty_pages,
        resume_vm=params.resume_vm,
        progress=call.progress,
    )
    elapsed = (time.monotonic() - started) * _MS_PER_S
    return SnapshotLoadResult(
        vm=await _info(api, params.vm_id), duration_ms=round(elapsed, 3),
        bytes_restored=vm.mem_size_mib * _MIB,
    )


async def snapshot_describe(
    api: ApiContext, call: CallInfo, params: SnapshotDescribeParams
) -> dict[str, Any]:
    """Describe a state file (and check its memory file when asked).

    A damaged file is not an error of the call: the description lists what
    is wrong (``ok: false`` and ``errors``), as ``squibd --describe-snapshot`` does.
    """
    snap = _path(api, params.snapshot_path, "snapshot_path")
    mem = None
    if params.mem_file_path is not None:
        mem = _path(api, params.mem_file_path, "mem_file_path")
    description = await trio.to_thread.run_sync(
        lambda: describe_snapshot(
            snap, memory_file=mem, verify=params.verify, allowed_roots=api.allowed_roots
        )
    )
    return description.to_json()


async def snapshot_rebase(
    api: ApiContext, call: CallInfo, params: RebaseParams
) -> RebaseResult:
    """Merge a Diff onto its Full base into a new Full pair (in a worker thread).

    Cancellation sets the pair transaction's cancel event, checked between
    the merge's pieces and at each step before the commit point: the
    transaction then aborts (temps removed, previous output pair intact). A
    cancel that arrives after the commit is too late, and the call succeeds.
    """
    base = _path(api, params.base_snapshot_path, "base_snapshot_path")
    if (params.diff_snapshot_path is None) == (params.diff_snapshot_paths is None):
        raise RpcError.invalid_params(
            "params: give exactly one of diff_snapshot_path and diff_snapshot_paths"
        )
    if params.diff_snapshot_paths is not None:
        if not params.diff_snapshot_paths:
            raise RpcError.invalid_params("params.diff_snapshot_paths: must not be empty")
        diffs = [
            _path(api, p, f"diff_snapshot_paths[{i}]")
            for i, p in enumerate(params.diff_snapshot_paths)
        ]
    else:
        assert params.diff_snapshot_path is not None
        diffs = [_path(api, params.diff_snapshot_path, "diff_snapshot_path")]
    out = _path(api, params.output_snapshot_path, "output_snapshot_path")
    out_mem = default_memory_path(out)
    if params.output_mem_file_path is not None:
        out_mem = _path(api, params.output_mem_file_path, "output_mem_file_path")

    merged: list[int] = []

    def work(cancel: threading.Event) -> None:
        manifest = rebase(base, diffs, out, out_mem, allowed_roots=api.allowed_roots,
                          cancel=cancel)  # fmt: skip
        merged.append(sum(extent.length for extent in manifest.extents))

    started = time.monotonic()
    # Cancelled before the commit step: the transaction aborts and Cancelled
    # propagates; after it: run_cancellable returns and the call succeeds.
    await run_cancellable(work, trio.to_thread.current_default_thread_limiter())
    elapsed = (time.monotonic() - started) * _MS_PER_S
    return RebaseResult(
        output_snapshot_path=out, output_mem_file_path=out_mem, duration_ms=round(elapsed, 3),
        bytes_written=merged[0] if merged else 0,
    )


async def vm_read_memory(
    api: ApiContext, call: CallInfo, params: ReadMemoryParams
) -> ReadMemoryResult:
    """Read guest RAM (debug API)."""
    data = await api.runtime.read_memory(params.vm_id, params.guest_addr, params.length)
    return ReadMemoryResult(data_base64=base64.b64encode(data).decode("ascii"))


async def vm_write_memory(
    api: ApiContext, call: CallInfo, params: WriteMemoryParams
) -> WriteMemoryResult:
    """Write guest RAM as a device would: the pages are marked dirty (debug API)."""
    try:
        data = base64.b64decode(params.data_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RpcError.invalid_params(f"params.data_base64: not valid base64 ({exc})") from exc
    if len(data) > MAX_WRITE_MEMORY:
        raise RpcError.invalid_params(
            f"params.data_base64: decodes to {len(data)} bytes, more than {MAX_WRITE_MEMORY}"
        )
    await api.runtime.write_memory(params.vm_id, params.guest_addr, data)
    return WriteMemoryResult(bytes_written=len(data))
