"""Load: build a fresh VM from a snapshot pair (SPEC section 8).

Theory of operation. ``load_snapshot`` reads and checks the state file
(size limit, CRC, magic, version, compatibility: ``read_state_file``),
checks the pair binding (``snapshot.verify.check_pair_binding``: the memory
file's size equals the manifest's and its ``user.squibd.pair`` xattr names
the manifest's pair; a memory file without the xattr, e.g. after a plain
``cp``, is verified in full against the manifest's digests) before any vCPU
exists, maps the memory, and rebuilds the VM: VM-level
state, then vCPU state. The VM is left Paused with its vCPU threads not yet
started, unless ``resume_vm``.

Backends:
- ``File``: the memory file mapped ``MAP_PRIVATE | MAP_NORESERVE``: lazily
  faulted, copy-on-write; guest writes never reach the file.
- ``Uffd``: anonymous memory registered with userfaultfd and served on
  demand by a page server (``squibd.uffd.UffdBackend``); if the page server
  dies after the vCPUs started, the VM enters the error state.

A restored VM's last checkpoint is the loaded pair, so a Diff taken after
the restore applies to it. With ``track_dirty_pages`` the slots log dirty
pages from the first instruction.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Final, cast

import trio

from ..kvm.errors import KvmError
from ..snapshot.envelope import read_state_file
from ..snapshot.errors import Capture, MemoryIo
from ..snapshot.manifest import KIND_FULL
from ..snapshot.models import VmInfo, X86MicrovmState
from ..snapshot.paths import open_client_file, validate_path
from ..snapshot.verify import verify_fd
from ..uffd import UffdBackend
from ._threads import run_blocking
from .build import build_restored
from .errors import PairMismatch
from .machine import Vm
from .memory import GuestMemory, MemoryLayoutError, layout_regions
from .models import BACKEND_FILE, BACKEND_UFFD, MemBackend, Progress

#: Builds a File load's VM elsewhere (``remote.ProcessVms.restored``'s signature).
RestoreFile = Callable[..., Any]

__all__ = ["load_snapshot"]

#: Phases reported to the progress callback, in order.
_PHASES: Final = ("read-state", "check-pair", "map-memory", "restore", "done")


def _report(progress: Progress | None, phase: str) -> None:
    if progress is not None:
        progress(phase, _PHASES.index(phase) + 1, len(_PHASES))


def _map_file(vm_id: str, state: X86MicrovmState, mem_path: str) -> GuestMemory:
    if state.memory.kind != KIND_FULL:
        raise PairMismatch(
            vm_id,
            "the snapshot is a Diff; rebase it onto its Full parent "
            "(squibd --rebase-snapshot) and load the result",
        )
    # One safe open (no final symlink, a regular file); checks and mapping use
    # that very inode (/proc/self/fd reopens it, never the client's path).
    try:
        fd = open_client_file(mem_path, "mem_file_path")
    except OSError as error:
        raise MemoryIo(error) from error
    try:
        # "size" is the pair binding: size + xattr, or every digest when the xattr is gone.
        verify_fd(fd, state.memory, "size")
        return GuestMemory.from_file(f"/proc/self/fd/{fd}", state.memory.regions)
    finally:
        os.close(fd)


def _check_recorded_layout(vm_id: str, state: X86MicrovmState) -> None:
    # Issue 14: the state file names the layout the save used; its manifest's
    # regions (what load maps) must be that layout's regions for the RAM size.
    recorded = state.vm_info.memory_layout
    total = sum(region.size for region in state.memory.regions)
    try:
        expected = layout_regions(recorded, total)
    except MemoryLayoutError as error:
        raise PairMismatch(vm_id, f"vm_info.memory_layout: {error}") from error
    if tuple(state.memory.regions) != expected:
        raise PairMismatch(
            vm_id,
            f"the state file records memory layout {recorded!r} but its memory "
            "regions do not follow it",
        )


async def load_snapshot(
    vm_id: str,
    snapshot_path: str,
    mem_backend: MemBackend,
    *,
    track_dirty_pages: bool,
    resume_vm: bool,
    quiesce_timeout_s: float,
    limiter: trio.CapacityLimiter,
    progress: Progress | None = None,
    admit: Callable[[VmInfo], Awaitable[None]] | None = None,
    peer_limiter: trio.CapacityLimiter | None = None,
    restore_file: RestoreFile | None = None,
) -> Vm:
    """Build VM ``vm_id`` from a pair (see the module doc).

    ``admit(vm_info)`` is awaited once the state file is read, before any
    memory is mapped: the runtime refuses there a VM over its limits.
    ``peer_limiter`` bounds the threads waiting on page servers (default: ``limiter``).
    ``restore_file`` builds the VM of a File load instead of ``build_restored``
    (issue 11: in its own VM process, ``remote.ProcessVms.restored``).

    Raises:
        InvalidPath: a path breaks SPEC section 10.
        CrcMismatch, TooShort, MagicMismatch, VersionMismatch, Bitcode,
        SizeLimitExceeded, Incompatible, Io: the state file is unusable.
        MemoryIo (MemoryPairMismatch): the memory file is of another pair or size,
            or has no pair xattr and does not match the manifest's digests.
        PairMismatch: the pair cannot be loaded as such (a Diff).
        UffdError: the page server is absent or refused the handshake.
        Capture: KVM refused the state.
    """
    snap = validate_path(snapshot_path, what="snapshot_path")
    backend_path = validate_path(
        mem_backend.backend_path,
        what="backend_path",
        socket=mem_backend.backend_type == BACKEND_UFFD,
    )
    _report(progress, "read-state")
    state = await run_blocking(lambda: read_state_file(snap), limiter)
    if not isinstance(state, X86MicrovmState):
        raise PairMismatch(vm_id, "the snapshot is not an x86_64 snapshot")
    _check_recorded_layout(vm_id, state)
    if admit is not None:
        await admit(state.vm_info)
    _report(progress, "check-pair")
    uffd_session: UffdBackend | None = None
    lazy_pair_id: str | None = None
    if mem_backend.backend_type == BACKEND_FILE:
        memory = await run_blocking(lambda: _map_file(vm_id, state, backend_path), limiter)
    elif restore_file is not None:
        # The VM process registers its own memory with the page server; the
        # daemon keeps an empty shadow (``remote.py``).
        memory = await run_blocking(lambda: GuestMemory.anonymous(state.memory.regions), limiter)
        lazy_pair_id = state.memory.pair_id
    else:
        memory, uffd_session = await _map_uffd(
            state, backend_path, limiter, peer_limiter if peer_limiter is not None else limiter
        )
    _report(progress, "map-memory")
    token = trio.lowlevel.current_trio_token()
    try:
        if restore_file is not None and uffd_session is None:
            restore = restore_file
            return_vm = await run_blocking(
                lambda: restore(
                    vm_id, state.vm_info, state.vm_state, state.vcpu_states, memory,
                    backend_path, track_dirty_pages=track_dirty_pages, token=token,
                    quiesce_timeout_s=quiesce_timeout_s, lazy_pair_id=lazy_pair_id,
                ),
                limiter if lazy_pair_id is None or peer_limiter is None else peer_limiter,
            )  # fmt: skip
            vm = cast(Vm, return_vm)
        else:
            vm = await run_blocking(
                lambda: build_restored(
                    vm_id,
                    state.vm_info,
                    state.vm_state,
                    state.vcpu_states,
                    memory,
                    track_dirty_pages=track_dirty_pages,
                    token=token,
                    quiesce_timeout_s=quiesce_timeout_s,
                ),
                limiter,
            )
    except BaseException as error:
        if uffd_session is not None:
            uffd_session.close()
        memory.close()
        if isinstance(error, KvmError):
            raise Capture(str(error)) from error
        raise
    vm.last_pair_id = state.memory.pair_id
    if uffd_session is not None:
        vm.attach_page_server(uffd_session)
    _report(progress, "restore")
    if resume_vm:
        vm.resume()
    _report(progress, "done")
    return vm


async def _map_uffd(
    state: X86MicrovmState,
    socket_path: str,
    limiter: trio.CapacityLimiter,
    peer_limiter: trio.CapacityLimiter,
) -> tuple[GuestMemory, UffdBackend]:
    """Anonymous memory registered with userfaultfd and handed to the page server.

    The handshake waits on a peer: it runs under ``peer_limiter``, so that
    page servers that stall cannot take the runtime's I/O threads.
    """
    memory = await run_blocking(lambda: GuestMemory.anonymous(state.memory.regions), limiter)
    try:
        session = await run_blocking(
            lambda: UffdBackend.connect(
                socket_path, memory, expected_pair_id=state.memory.pair_id
            ),
            peer_limiter,
        )
    except BaseException:
        memory.close()
        raise
    return memory, session
