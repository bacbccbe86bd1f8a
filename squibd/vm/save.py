"""Stop-and-copy save: quiesce, capture, stream, commit, resume (SPEC section 5).

Theory of operation. ``save_stop_and_copy`` runs the steps of SPEC section
5 in order on the trio thread, pushing every blocking step into a worker
thread:

1. validate (``SaveRequest.build``: type, paths, VM state, Diff needs
   dirty tracking) -- before anything is paused;
2. quiesce the vCPUs if the VM is running (``QuiesceTimeout`` leaves it
   running, nothing written);
3. capture vCPU and VM state, harvest the KVM dirty log into the VM's
   dirty bitmaps and take a copy of the dirty words;
4. in one worker thread: open the ``PairTransaction`` (temps beside the
   destinations), stream the pages with ``write_memory`` (Full: every
   page; Diff: the dirty runs), build the manifest, encode the state and
   commit the pair. Trio cancellation sets the writer's cancel event and
   the transaction aborts (temps removed);
5. only after the commit: clear the saved dirty bits and record the pair
   as the VM's last checkpoint;
6. resume the vCPUs if they were running, on every path.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Final

import attrs
import trio

from ..kvm.errors import KvmError
from ..snapshot.commit import PairTransaction
from ..snapshot.envelope import encode_state
from ..snapshot.errors import Capture
from ..snapshot.manifest import KIND_DIFF, KIND_FULL, MemoryManifest
from ..snapshot.memwriter import WriterThreads, build_manifest, set_pair_xattr, write_memory
from ..snapshot.models import SnapshotMetadata, X86MicrovmState
from ..snapshot.paths import validate_path
from ._threads import run_blocking, run_cancellable
from .dirty import runs_of
from .errors import DiffNotAllowed, NoParentCheckpoint, WrongVmState
from .machine import CapturedState, Vm
from .models import SNAPSHOT_TYPES, Progress, SaveResult, VmState

__all__ = [
    "ByteProgress",
    "SaveRequest",
    "capture",
    "commit_pair",
    "commit_state",
    "save_stop_and_copy",
    "thread_progress",
]

_MS_PER_S: Final = 1000.0

#: ``(bytes_done, bytes_total)``, called from the writer's thread.
ByteProgress = Callable[[int, int], None]


@attrs.frozen
class SaveRequest:
    """A validated snapshot request (build it with ``SaveRequest.build``)."""

    snapshot_type: str
    snapshot_path: str
    mem_file_path: str
    live: bool
    max_passes: int
    pause_budget_ms: float
    resume: bool
    #: Stored in the state file (labels, created_at, vm id, host); None: none stored.
    metadata: SnapshotMetadata | None = None

    @property
    def kind(self) -> str:
        """The manifest kind (``Full`` or ``Diff``)."""
        return KIND_DIFF if self.snapshot_type == "Diff" else KIND_FULL

    @classmethod
    def build(
        cls,
        vm: Vm,
        *,
        snapshot_type: str,
        snapshot_path: str,
        mem_file_path: str,
        live: bool,
        max_passes: int,
        pause_budget_ms: float,
        resume: bool,
    ) -> SaveRequest:
        """Check a request against the VM before anything is paused or written.

        Raises:
            ValueError: unknown snapshot type, or live parameters out of range.
            InvalidPath: a path breaks SPEC section 10, or the two paths are equal.
            WrongVmState: the VM was never started.
            DiffNotAllowed: a Diff on a VM without dirty page tracking.
            NoParentCheckpoint: a Diff on a VM that has no checkpoint yet.
        """
        if snapshot_type not in SNAPSHOT_TYPES:
            raise ValueError(
                f"snapshot_type must be one of {', '.join(SNAPSHOT_TYPES)}, not {snapshot_type!r}"
            )
        if max_passes < 1:
            raise ValueError(f"max_passes must be at least 1, not {max_passes}")
        if pause_budget_ms < 0:
            raise ValueError(f"pause_budget_ms must not be negative, not {pause_budget_ms}")
        snap = validate_path(snapshot_path, what="snapshot_path")
        mem = validate_path(mem_file_path, what="mem_file_path")
        if vm.state is VmState.NOT_STARTED:
            raise WrongVmState(vm.vm_id, str(vm.state), "snapshot")
        if snapshot_type == "Diff" and not vm.track_dirty_pages:
            raise DiffNotAllowed(vm.vm_id)
        if snapshot_type == "Diff" and vm.last_pair_id is None:
            raise NoParentCheckpoint(vm.vm_id)
        return cls(snapshot_type, snap, mem, live, max_passes, pause_budget_ms, resume)


def thread_progress(progress: Progress | None, phase: str) -> ByteProgress | None:
    """A ``(done, total)`` callback for worker threads that reports on the trio thread."""
    if progress is None:
        return None
    token = trio.lowlevel.current_trio_token()
    report = progress

    def callback(done: int, total: int) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(report, phase, done, total)

    return callback


def commit_pair(
    vm: Vm,
    request: SaveRequest,
    captured: CapturedState,
    runs: list[list[tuple[int, int]]] | None,
    *,
    pair_id: str,
    parent_pair_id: str | None,
    cancel: threading.Event,
    progress: ByteProgress | None,
    threads: WriterThreads | None = None,
) -> tuple[MemoryManifest, int]:
    """Write the memory file and the state file and commit them as one pair.

    Runs in a worker thread. Returns the manifest and the pages written.
    Exiting without a commit (an error, ``cancel`` set) removes the temps.
    """
    with PairTransaction(request.snapshot_path, request.mem_file_path) as txn:
        result = write_memory(
            txn.mem_fd,
            vm.region_sources(),
            kind=request.kind,
            runs_per_region=runs,
            progress=progress,
            cancel=cancel,
            threads=threads,
        )
        manifest = build_manifest(
            result,
            vm.memory.manifest_regions(),
            kind=request.kind,
            pair_id=pair_id,
            parent_pair_id=parent_pair_id,
            page_size=vm.page_size,
        )
        commit_state(txn, vm, captured, manifest, request.metadata)
    return manifest, int(result.pages_written)


def commit_state(
    txn: PairTransaction,
    vm: Vm,
    captured: CapturedState,
    manifest: MemoryManifest,
    metadata: SnapshotMetadata | None = None,
) -> None:
    """Tag the memory file with the manifest's pair id, encode the state, commit the pair.

    Runs in a worker thread, once ``txn.mem_fd`` holds everything ``manifest``
    describes. Stop-and-copy and live saves end here alike.
    """
    state = X86MicrovmState(
        vm_info=vm.vm_info(),
        vm_state=captured.vm_state,
        vcpu_states=captured.vcpu_states,
        device_states=(),
        mmds_state=None,
        memory=manifest,
        metadata=metadata,
    )
    set_pair_xattr(txn.mem_fd, manifest.pair_id)
    txn.commit(encode_state(state))


async def capture(vm: Vm, limiter: trio.CapacityLimiter) -> CapturedState:
    """Capture the parked VM's state in a worker thread.

    Raises:
        Capture: KVM refused to hand out a piece of state.
    """
    try:
        return await run_blocking(vm.capture_state, limiter)
    except KvmError as error:
        raise Capture(str(error)) from error


async def save_stop_and_copy(
    vm: Vm,
    request: SaveRequest,
    *,
    limiter: trio.CapacityLimiter,
    progress: Progress | None,
    threads: WriterThreads | None = None,
) -> SaveResult:
    """Save ``vm`` with its vCPUs paused for the whole write (see the module doc).

    ``threads``: where the memory writer's helper threads come from (the runtime's pool).
    """
    started = time.perf_counter()
    was_running = vm.state is VmState.RUNNING
    pause_started = time.perf_counter()
    if was_running:
        await vm.pause()
    pause_ms = 0.0
    committed = False
    try:
        captured = await capture(vm, limiter)
        saved_words = await run_blocking(vm.harvest_dirty, limiter)
        runs = runs_of(saved_words) if request.kind == KIND_DIFF else None
        parent = vm.last_pair_id if request.kind == KIND_DIFF else None
        pair_id = str(uuid.uuid4())
        callback = thread_progress(progress, "memory")
        manifest, pages = await run_cancellable(
            lambda cancel: commit_pair(
                vm,
                request,
                captured,
                runs,
                pair_id=pair_id,
                parent_pair_id=parent,
                cancel=cancel,
                progress=callback,
                threads=threads,
            ),
            limiter,
        )
        # Committed: only now may the saved dirty bits go (SPEC section 5, step 7).
        vm.dirty.clear(saved_words)
        vm.last_pair_id = pair_id
        committed = True
    finally:
        if was_running:
            if request.resume or not committed:
                vm.resume()
            pause_ms = (time.perf_counter() - pause_started) * _MS_PER_S
    return SaveResult(
        vm_id=vm.vm_id,
        snapshot_type=request.snapshot_type,
        snapshot_path=request.snapshot_path,
        mem_file_path=request.mem_file_path,
        pair_id=pair_id,
        parent_pair_id=parent,
        bytes_written=manifest.bytes_written,
        pages_written=pages,
        live=False,
        passes=1,
        bytes_per_pass=(manifest.bytes_written,),
        pause_ms=pause_ms,
        duration_ms=(time.perf_counter() - started) * _MS_PER_S,
    )

