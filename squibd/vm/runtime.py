"""The VM runtime: a registry of VMs and the trio entry points the API calls.

Every method names the VM it acts on and checks its lifecycle state first
(``WrongVmState``, ``UnknownVm``, ``VmFailed``). Long operations (save,
load) mark the VM busy so that a second one fails with ``Busy`` instead of
interleaving; trio cancellation of either rolls back (see ``save.py``,
``live.py``, ``load.py``).
"""

from __future__ import annotations

from typing import Final

import attrs
import trio

from ..kvm.runner import install_signal_handler
from ..snapshot.models import SnapshotMetadata
from ._threads import IO_LIMITER_TOKENS, run_blocking
from .build import build_fresh
from .errors import Busy, DuplicateVm, UnknownVm, VmFailed, WrongVmState
from .live import save_live
from .load import load_snapshot
from .machine import Vm
from .models import (
    DEFAULT_MAX_PASSES,
    DEFAULT_PAUSE_BUDGET_MS,
    DEFAULT_QUIESCE_TIMEOUT_S,
    GuestSpec,
    MemBackend,
    Progress,
    SaveResult,
    VmDescription,
    VmState,
)
from .save import SaveRequest, save_stop_and_copy

__all__ = ["Runtime"]

_OP_SAVE: Final = "snapshot save"
_OP_LOAD: Final = "snapshot load"


@attrs.define(eq=False)
class Runtime:
    """Registry and lifecycle of the VMs of one daemon (trio; one per process).

    Args:
        quiesce_timeout_s: the quiesce cancel scope (SPEC section 6).
        io_threads: worker threads for blocking I/O and ioctls.
    """

    quiesce_timeout_s: float = DEFAULT_QUIESCE_TIMEOUT_S
    io_threads: int = IO_LIMITER_TOKENS
    _vms: dict[str, Vm] = attrs.field(init=False, factory=dict)
    _limiter: trio.CapacityLimiter = attrs.field(init=False)

    @_limiter.default
    def _make_limiter(self) -> trio.CapacityLimiter:
        return trio.CapacityLimiter(self.io_threads)

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
        """What the VM is doing now: state, sizes, guest progress, error."""
        return self.get(vm_id).describe()

    async def create_vm(
        self,
        vm_id: str,
        vcpu_count: int,
        mem_size_mib: int,
        track_dirty_pages: bool,
        guest: GuestSpec | None = None,
    ) -> Vm:
        """Create a VM in the NotStarted state running a built-in guest program.

        Raises:
            DuplicateVm: ``vm_id`` is taken.
            InvalidVmConfig: the vCPU count, memory size or guest is not usable here.
        """
        if vm_id in self._vms:
            raise DuplicateVm(vm_id)
        spec = guest if guest is not None else GuestSpec()
        token = trio.lowlevel.current_trio_token()
        vm = await run_blocking(
            lambda: build_fresh(
                vm_id,
                vcpu_count,
                mem_size_mib,
                track_dirty_pages,
                spec,
                token=token,
                quiesce_timeout_s=self.quiesce_timeout_s,
            ),
            self._limiter,
        )
        if vm_id in self._vms:  # raced with another create of the same id
            vm.close()
            raise DuplicateVm(vm_id)
        self._vms[vm_id] = vm
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
        """Destroy every VM (daemon shutdown)."""
        for vm_id in list(self._vms):
            vm = self._vms.pop(vm_id)
            await run_blocking(vm.close, self._limiter)

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

    def read_memory(self, vm_id: str, guest_addr: int, length: int) -> bytes:
        """Read guest RAM."""
        return self.get(vm_id).memory.read(guest_addr, length)

    def write_memory(self, vm_id: str, guest_addr: int, data: bytes) -> None:
        """Write guest RAM as a device would: the pages are marked dirty."""
        self.get(vm_id).write_memory(guest_addr, data)

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
            if live:
                return await save_live(
                    vm, request, limiter=self._limiter, progress=progress
                )
            return await save_stop_and_copy(
                vm, request, limiter=self._limiter, progress=progress
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
        try:
            vm = await load_snapshot(
                vm_id,
                snapshot_path,
                mem_backend,
                track_dirty_pages=track_dirty_pages,
                resume_vm=resume_vm,
                quiesce_timeout_s=self.quiesce_timeout_s,
                limiter=self._limiter,
                progress=progress,
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
        return vm

    # --- helpers ---------------------------------------------------------

    def _healthy(self, vm_id: str, op: str) -> Vm:
        vm = self.get(vm_id)
        if vm.error is not None:
            raise VmFailed(vm_id, op, vm.error)
        return vm

    @staticmethod
    def _not_busy(vm: Vm) -> None:
        if vm.busy is not None:
            raise Busy(vm.vm_id, vm.busy)


