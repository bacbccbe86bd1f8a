"""The VM runtime: a registry of VMs and the trio entry points the API calls.

Every method names the VM it acts on and checks its lifecycle state first
(``WrongVmState``, ``UnknownVm``, ``VmFailed``). Long operations (save,
load) mark the VM busy so that a second one fails with ``Busy`` instead of
interleaving; trio cancellation of either rolls back (see ``save.py``,
``live.py``, ``load.py``).
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar, cast

import attrs
import trio

from ..kvm.runner import install_signal_handler
from ..snapshot.manifest import KIND_FULL
from ..snapshot.models import SnapshotMetadata, VmInfo
from ..vmm.host import ZygoteHost
from ._threads import IO_LIMITER_TOKENS, run_blocking
from .build import build_fresh, check_config
from .errors import (
    Busy,
    DuplicateVm,
    GuestMemoryUnavailable,
    ResourceExhausted,
    UnknownVm,
    VmFailed,
    WrongVmState,
)
from .limits import Ledger, Reservation, RuntimeLimits, check_fd_headroom
from .live import save_live
from .load import load_snapshot
from .machine import Vm
from .memory import DEFAULT_MEMORY_LAYOUT
from .models import (
    DEFAULT_MAX_PASSES,
    DEFAULT_PAUSE_BUDGET_MS,
    DEFAULT_QUIESCE_TIMEOUT_S,
    DEFAULT_VM_ISOLATION,
    GuestSpec,
    MemBackend,
    Progress,
    SaveResult,
    VmDescription,
    VmState,
)
from .remote import ProcessVms
from .save import SaveRequest, save_stop_and_copy
from .writer_pool import WriterPool

__all__ = ["DEFAULT_MEMORY_TIMEOUT_S", "Runtime"]

_OP_SAVE: Final = "snapshot save"
_OP_LOAD: Final = "snapshot load"
#: How long vm.describe/vm.list and the debug memory methods wait for guest
#: memory (a lazy VM's page may never be served) before answering without it.
DEFAULT_MEMORY_TIMEOUT_S: Final = 2.0
#: A Full save of a lazy VM first faults its memory in; it fails when the page
#: server serves nothing (not one 16 MiB step) for this long.
DEFAULT_PAGE_SERVER_STALL_S: Final = 5.0
#: Page-server handshakes in progress at once (each may wait on a slow peer).
PEER_THREADS: Final = 16

T = TypeVar("T")


@attrs.define(eq=False)
class Runtime:
    """Registry and lifecycle of the VMs of one daemon (trio; one per process).

    Args:
        quiesce_timeout_s: the quiesce cancel scope (SPEC section 6).
        io_threads: worker threads for blocking I/O and ioctls.
        limits: how many VMs, vCPUs and MiB of guest RAM it admits (``limits.py``).
        memory_timeout_s: bound on every wait for guest memory (progress
            reads, the debug memory methods).
        page_server_stall_s: a Full save of a lazy VM fails when its page
            server serves nothing for this long (``Vm.populate_lazy``).

    The trio thread never touches guest memory: reads and writes run in
    worker threads with the GIL released (``guest_access.py``), bounded by
    ``memory_timeout_s``.
    """

    quiesce_timeout_s: float = DEFAULT_QUIESCE_TIMEOUT_S
    io_threads: int = IO_LIMITER_TOKENS
    limits: RuntimeLimits = attrs.field(factory=RuntimeLimits)
    memory_timeout_s: float = DEFAULT_MEMORY_TIMEOUT_S
    page_server_stall_s: float = DEFAULT_PAGE_SERVER_STALL_S
    #: Issue 11: ``"process"`` runs each VM in its own VM process, ``"inprocess"`` here.
    vm_isolation: str = DEFAULT_VM_ISOLATION
    #: Issue 11: where VM processes keep their re-attach sockets and records.
    state_dir: str | None = None
    #: Issue 11: whether daemon shutdown stops the VM processes (else they keep running).
    stop_vms_on_exit: bool = False
    #: Issue 11: the VM processes' privilege drop and seccomp (``squibd.vmm.confine``).
    confine: dict[str, Any] | None = None
    #: Issue 11: a zygote started already (the daemon's, started before any thread).
    zygote: ZygoteHost | None = None
    _vms: dict[str, Vm] = attrs.field(init=False, factory=dict)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)
    #: Helper threads of the memory writers of every save (bounded, visible here).
    writer_pool: WriterPool = attrs.field(init=False)
    _ledger: Ledger = attrs.field(init=False)
    #: Threads waiting on a peer (page-server handshakes), apart from the I/O threads.
    _peer_limiter: trio.CapacityLimiter = attrs.field(
        init=False, factory=lambda: trio.CapacityLimiter(PEER_THREADS)
    )

    @writer_pool.default
    def _make_writer_pool(self) -> WriterPool:
        return WriterPool(self.io_threads)

    @_ledger.default
    def _make_ledger(self) -> Ledger:
        return Ledger(self.limits)

    @_limiter.default
    def _make_limiter(self) -> trio.CapacityLimiter:
        return trio.CapacityLimiter(self.io_threads)

    _process_vms: ProcessVms | None = attrs.field(init=False, default=None)

    @property
    def process_vms(self) -> ProcessVms | None:
        """The VM-process factory when ``vm_isolation == "process"``."""
        if self.vm_isolation != "process":
            return None
        if self._process_vms is None:
            host = self.zygote if self.zygote is not None else ZygoteHost()
            self._process_vms = ProcessVms(state_dir=self.state_dir, confine=self.confine,
                                           host=host)  # fmt: skip
        return self._process_vms

    async def reattach(self) -> builtins.list[str]:
        """Re-attach the VM processes a previous daemon left under ``state_dir`` (issue 11).

        Also starts the warm zygote. Returns the ids of the VMs found.
        """
        factory = self.process_vms
        if factory is None:
            return []
        token = trio.lowlevel.current_trio_token()
        await run_blocking(factory.warm, self._limiter)
        found = await run_blocking(
            lambda: factory.reattach(quiesce_timeout_s=self.quiesce_timeout_s, token=token),
            self._limiter,
        )
        for vm in found:
            if vm.vm_id in self._vms:
                await run_blocking(vm.detach, self._limiter)
                continue
            self._vms[vm.vm_id] = cast(Vm, vm)
        return [vm.vm_id for vm in found]

    def __attrs_post_init__(self) -> None:
        # The vCPU pause signal needs a Python handler installed from the main
        # thread; the runtime is created there (on the trio thread).
        install_signal_handler()

    # --- registry --------------------------------------------------------

    def get(self, vm_id: str) -> Vm:
        """The VM named ``vm_id``.

        Raises:
            UnknownVm: no such VM.
        """
        try:
            return self._vms[vm_id]
        except KeyError:
            raise UnknownVm(vm_id) from None

    def list(self) -> list[str]:
        """Ids of every registered VM, sorted."""
        return sorted(self._vms)

    def describe(self, vm_id: str) -> VmDescription:
        """What the VM is doing now, with the last known guest progress (flagged stale).

        Reads no guest memory; :meth:`describe_current` reads the progress.
        """
        return self.get(vm_id).describe()

    async def describe_current(self, vm_id: str) -> VmDescription:
        """Like :meth:`describe`, with the progress read now (bounded by ``memory_timeout_s``)."""
        vm = self.get(vm_id)
        return vm.describe(await vm.read_progress(self.memory_timeout_s))

    async def describe_many(self, vm_ids: Sequence[str]) -> builtins.list[VmDescription]:
        """:meth:`describe_current` of each VM, read concurrently (one bound for all).

        A VM destroyed meanwhile is left out.
        """
        out: dict[str, VmDescription] = {}

        async def one(vm_id: str) -> None:
            with contextlib.suppress(UnknownVm):
                out[vm_id] = await self.describe_current(vm_id)

        async with trio.open_nursery() as nursery:
            for vm_id in vm_ids:
                nursery.start_soon(one, vm_id)
        return [out[vm_id] for vm_id in vm_ids if vm_id in out]

    async def create_vm(
        self,
        vm_id: str,
        vcpu_count: int,
        mem_size_mib: int,
        track_dirty_pages: bool,
        guest: GuestSpec | None = None,
        memory_layout: str = DEFAULT_MEMORY_LAYOUT,
    ) -> Vm:
        """Create a VM in the NotStarted state running a built-in guest program.

        ``memory_layout``: ``"squibd"`` or ``"firecracker"`` (``memory.MEMORY_LAYOUTS``).

        Raises:
            DuplicateVm: ``vm_id`` is taken.
            InvalidVmConfig: the vCPU count, memory size or guest is not usable here.
        """
        if vm_id in self._vms:
            raise DuplicateVm(vm_id)
        check_config(vm_id, vcpu_count, mem_size_mib)
        spec = guest if guest is not None else GuestSpec()
        token = trio.lowlevel.current_trio_token()
        reservation = self._admit(vm_id, vcpu_count, mem_size_mib)
        try:

            factory = self.process_vms

            def build() -> Vm:
                check_fd_headroom(vm_id, vcpu_count, self.limits.fd_reserve,
                                  in_process=factory is None)  # fmt: skip
                if factory is not None:
                    return cast(Vm, factory.fresh(
                        vm_id, vcpu_count, mem_size_mib, track_dirty_pages, spec, token=token,
                        quiesce_timeout_s=self.quiesce_timeout_s, memory_layout=memory_layout,
                    ))  # fmt: skip
                return build_fresh(
                    vm_id,
                    vcpu_count,
                    mem_size_mib,
                    track_dirty_pages,
                    spec,
                    token=token,
                    quiesce_timeout_s=self.quiesce_timeout_s,
                    memory_layout=memory_layout,
                )

            vm = await _typed_exhaustion(vm_id, run_blocking(build, self._limiter))
            if vm_id in self._vms:  # raced with another create of the same id
                await run_blocking(vm.close, self._limiter)
                raise DuplicateVm(vm_id)
            self._vms[vm_id] = vm
        finally:
            reservation.release()
        return vm

    async def destroy(self, vm_id: str) -> None:
        """Stop the VM's vCPUs, release its memory and forget it.

        Raises:
            Busy: a save or load of the VM is running.
        """
        vm = self.get(vm_id)
        if vm.busy is not None:
            raise Busy(vm_id, vm.busy)
        del self._vms[vm_id]
        await run_blocking(vm.close, self._limiter)

    async def aclose(self) -> None:
        """Destroy every VM (daemon shutdown), several at once.

        Each close is bounded (``Vm.close``); VMs stuck on a page server must not add up.
        """
        vms = list(self._vms.values())
        self._vms.clear()
        async with trio.open_nursery() as nursery:
            for vm in vms:
                detach = getattr(vm, "detach", None)
                if detach is not None and not self.stop_vms_on_exit and self.state_dir:
                    nursery.start_soon(run_blocking, detach, self._limiter)
                else:
                    nursery.start_soon(run_blocking, vm.close, self._limiter)
        if self._process_vms is not None:
            await run_blocking(self._process_vms.close, self._limiter)

    # --- lifecycle -------------------------------------------------------

    async def start(self, vm_id: str) -> None:
        """Start a NotStarted VM's vCPUs."""
        vm = self._healthy(vm_id, "start")
        if vm.state is not VmState.NOT_STARTED:
            raise WrongVmState(vm_id, str(vm.state), "start")
        vm.start()

    async def pause(self, vm_id: str) -> None:
        """Quiesce a Running VM and leave it Paused.

        Raises:
            QuiesceTimeout: a vCPU did not acknowledge; the VM keeps running.
        """
        vm = self._healthy(vm_id, "pause")
        self._not_busy(vm)
        if vm.state is not VmState.RUNNING:
            raise WrongVmState(vm_id, str(vm.state), "pause")
        await vm.pause()

    async def resume(self, vm_id: str) -> None:
        """Let a Paused VM run again."""
        vm = self._healthy(vm_id, "resume")
        self._not_busy(vm)
        if vm.state is not VmState.PAUSED:
            raise WrongVmState(vm_id, str(vm.state), "resume")
        vm.resume()

    # --- memory access (device emulation, tests) -------------------------

    async def read_memory(self, vm_id: str, guest_addr: int, length: int) -> bytes:
        """Read guest RAM (in a worker thread).

        Raises:
            GuestAddressError: the range is not inside one region.
            GuestMemoryUnavailable: the memory did not answer within ``memory_timeout_s``.
        """
        vm = self.get(vm_id)
        return await self._in_memory(vm, lambda: vm.read_memory(guest_addr, length))

    async def write_memory(self, vm_id: str, guest_addr: int, data: bytes) -> None:
        """Write guest RAM as a device would (in a worker thread): the pages are marked dirty.

        Raises:
            GuestAddressError, GuestMemoryUnavailable: as :meth:`read_memory`.
        """
        vm = self.get(vm_id)
        await self._in_memory(vm, lambda: vm.write_memory(guest_addr, data))

    async def _in_memory(self, vm: Vm, fn: Callable[[], T]) -> T:
        # One access per VM at a time (its limiter), abandoned (not killed)
        # when it does not finish in time: a stuck one holds that VM's token
        # until the page is served or the VM is destroyed.
        with trio.move_on_after(self.memory_timeout_s):
            return await trio.to_thread.run_sync(
                fn, limiter=vm.memory_limiter, abandon_on_cancel=True
            )
        raise GuestMemoryUnavailable(vm.vm_id, self.memory_timeout_s)

    # --- snapshots -------------------------------------------------------

    async def save(
        self,
        vm_id: str,
        snapshot_type: str,
        snapshot_path: str,
        mem_file_path: str,
        *,
        live: bool = False,
        max_passes: int = DEFAULT_MAX_PASSES,
        pause_budget_ms: float = DEFAULT_PAUSE_BUDGET_MS,
        resume: bool = True,
        progress: Progress | None = None,
        metadata: SnapshotMetadata | None = None,
    ) -> SaveResult:
        """Save the VM as a snapshot pair (SPEC section 5).

        ``resume=False`` leaves a Running VM Paused after the save (the pause
        instant is then the saved instant, which tests compare against).

        Raises:
            Busy, WrongVmState, VmFailed, DiffNotAllowed, InvalidPath,
            QuiesceTimeout, MemoryIo, Io, AtomicCommitFailed,
            AtomicCommitCrossFs, Capture: see SPEC sections 2 and 5. On any
            of them the VM runs as before and its dirty set is kept.
        """
        vm = self._healthy(vm_id, "snapshot")
        request = SaveRequest.build(
            vm,
            snapshot_type=snapshot_type,
            snapshot_path=snapshot_path,
            mem_file_path=mem_file_path,
            live=live,
            max_passes=max_passes,
            pause_budget_ms=pause_budget_ms,
            resume=resume,
        )
        if metadata is not None:
            request = attrs.evolve(request, metadata=metadata)
        self._not_busy(vm)
        vm.busy = _OP_SAVE
        try:
            if request.kind == KIND_FULL:
                await vm.populate_lazy(self.page_server_stall_s)
            if live:
                return await save_live(
                    vm, request, limiter=self._limiter, progress=progress,
                    threads=self.writer_pool,
                )  # fmt: skip
            return await save_stop_and_copy(
                vm, request, limiter=self._limiter, progress=progress, threads=self.writer_pool
            )
        finally:
            vm.busy = None

    async def load(
        self,
        vm_id: str,
        snapshot_path: str,
        mem_backend: MemBackend,
        *,
        track_dirty_pages: bool = False,
        resume_vm: bool = False,
        progress: Progress | None = None,
    ) -> Vm:
        """Build VM ``vm_id`` from a snapshot pair (SPEC section 8).

        A NotStarted VM of that id is replaced; any other existing VM is
        refused with ``WrongVmState``.
        """
        existing = self._vms.get(vm_id)
        if existing is not None:
            if existing.busy is not None:
                raise Busy(vm_id, existing.busy)
            if existing.state is not VmState.NOT_STARTED:
                raise WrongVmState(vm_id, str(existing.state), "load a snapshot into")
        placeholder = existing
        if placeholder is not None:
            placeholder.busy = _OP_LOAD
        reservations: list[Reservation] = []

        async def admit(info: VmInfo) -> None:
            # The placeholder is replaced: it does not count against the new VM.
            reservations.append(
                self._admit(vm_id, info.vcpu_count, info.mem_size_mib, skip=placeholder)
            )
            await run_blocking(
                lambda: check_fd_headroom(vm_id, info.vcpu_count, self.limits.fd_reserve,
                                          in_process=self.process_vms is None),
                self._limiter,
            )

        try:
            try:
                vm = await _typed_exhaustion(
                    vm_id,
                    load_snapshot(
                        vm_id,
                        snapshot_path,
                        mem_backend,
                        track_dirty_pages=track_dirty_pages,
                        resume_vm=resume_vm,
                        quiesce_timeout_s=self.quiesce_timeout_s,
                        limiter=self._limiter,
                        progress=progress,
                        admit=admit,
                        peer_limiter=self._peer_limiter,
                        restore_file=(
                            self.process_vms.restored if self.process_vms is not None else None
                        ),
                    ),
                )
            finally:
                if placeholder is not None:
                    placeholder.busy = None
            if placeholder is not None:
                self._vms.pop(vm_id, None)
                await run_blocking(placeholder.close, self._limiter)
            if vm_id in self._vms:  # raced with a create of the same id
                await run_blocking(vm.close, self._limiter)
                raise DuplicateVm(vm_id)
            self._vms[vm_id] = vm
        finally:
            for reservation in reservations:
                reservation.release()
        return vm

    # --- helpers ---------------------------------------------------------

    def _admit(
        self, vm_id: str, vcpus: int, mem_mib: int, *, skip: Vm | None = None
    ) -> Reservation:
        existing = ((vm.vcpu_count, vm.mem_size_mib) for vm in self._vms.values() if vm is not skip)
        return self._ledger.admit(vm_id, vcpus, mem_mib, existing)

    def _healthy(self, vm_id: str, op: str) -> Vm:
        vm = self.get(vm_id)
        if vm.error is not None:
            raise VmFailed(vm_id, op, vm.error)
        return vm

    @staticmethod
    def _not_busy(vm: Vm) -> None:
        if vm.busy is not None:
            raise Busy(vm.vm_id, vm.busy)




async def _typed_exhaustion(vm_id: str, work: Awaitable[T]) -> T:
    """Await ``work``; an EMFILE/ENFILE/ENOMEM in its error becomes ``ResourceExhausted``."""
    try:
        return await work
    except ResourceExhausted:
        raise
    except Exception as error:
        exhausted = ResourceExhausted.from_error(vm_id, error)
        if exhausted is None:
            raise
        raise exhausted from error
