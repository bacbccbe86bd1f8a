"""One VM: its KVM objects, guest memory, vCPU threads, dirty set and lifecycle.

A ``Vm`` is built either fresh (``Vm.create``: a built-in guest program in
new memfd RAM) or from a snapshot (``Vm.restore``: RAM given by the loader,
VM-level state restored before vCPU state). Building runs in a worker
thread; the lifecycle methods (``start``, ``pause``, ``resume``) run on the
trio thread. Blocking helpers used by the save and load orchestration
(``capture_state``, ``harvest_kvm``, ...) run in worker threads while the
vCPUs are parked or, for a live save's harvests, while they run.

Dirty set. For a VM with ``track_dirty_pages`` every memory slot carries
``KVM_MEM_LOG_DIRTY_PAGES`` and the VM keeps one ``DirtyBitmap`` per
region: KVM harvests are OR-ed into it, and so are squibd's own writes
(``write_memory``). A save copies the words, writes them, and after the
commit clears exactly those words, so marks that arrive meanwhile survive.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from typing import Final, Protocol

import attrs
import numpy as np
import trio

from ..kvm import guest as kvm_guest
from ..kvm.runner import VcpuRunner
from ..kvm.system import Kvm
from ..kvm.vcpu import Vcpu
from ..kvm.vm import KvmVm
from ..snapshot.bitmap import DirtyBitmap, Words, runs_from_words
from ..snapshot.memwriter import RegionSource
from ..snapshot.models import VmInfo, X86VcpuState, X86VmState
from ..uffd import UffdBackend
from .errors import InvalidVmConfig
from .memory import GuestMemory
from .models import GuestSpec, VmDescription, VmState
from .quiesce import VcpuGate, quiesce

__all__ = ["MAX_VCPUS", "PAGE_SIZE", "CapturedState", "Vm"]

#: SPEC section 3: a state file holds 1 to 32 vCPUs.
MAX_VCPUS: Final = 32
#: SPEC section 1: the host page, read from the system.
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
#: Progress counters are little-endian u64 (the guest programs of squibd.kvm).
_U64: Final = struct.Struct("<Q")

Run = tuple[int, int]


class Closeable(Protocol):
    """Anything with a ``close()``: a resource the VM owns."""

    def close(self) -> None: ...


@attrs.frozen
class CapturedState:
    """vCPU and VM-level state captured while every vCPU was parked."""

    vm_state: X86VmState
    vcpu_states: tuple[X86VcpuState, ...]


def _check_config(vm_id: str, vcpu_count: int, mem_size_mib: int) -> None:
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise InvalidVmConfig(vm_id, f"vcpu_count must be 1 to {MAX_VCPUS}, not {vcpu_count}")
    if mem_size_mib < 1:
        raise InvalidVmConfig(vm_id, f"mem_size_mib must be at least 1, not {mem_size_mib}")


@attrs.define(eq=False)
class Vm:
    """A VM run by squibd (see the module doc). Build with ``create`` or ``restore``."""

    vm_id: str
    vcpu_count: int
    mem_size_mib: int
    track_dirty_pages: bool
    guest: GuestSpec | None
    memory: GuestMemory = attrs.field(repr=False)
    quiesce_timeout_s: float
    _kvm: Kvm = attrs.field(repr=False)
    _kvm_vm: KvmVm = attrs.field(repr=False)
    _vcpus: list[Vcpu] = attrs.field(repr=False)
    _gate: VcpuGate = attrs.field(repr=False)
    _progress_addrs: tuple[int, ...] = attrs.field(repr=False)
    state: VmState = VmState.NOT_STARTED
    #: Non-None once a vCPU failed (exit error); the VM then refuses to run.
    error: str | None = None
    #: Name of the long operation running on this VM (save, load), if any.
    busy: str | None = None
    #: pair_id of the last committed snapshot: the parent of the next Diff.
    last_pair_id: str | None = None
    _runners: list[VcpuRunner] = attrs.field(factory=list, repr=False)
    _dirty: list[DirtyBitmap] = attrs.field(factory=list, repr=False)
    #: Whether the memory slots currently carry KVM_MEM_LOG_DIRTY_PAGES.
    _log_enabled: bool = False
    #: Pages squibd wrote during a live save (None outside one), per region.
    _journal: list[DirtyBitmap] | None = attrs.field(default=None, repr=False)
    #: Extra resources closed with the VM after its vCPUs stop (a page-server session).
    _resources: list[Closeable] = attrs.field(factory=list, repr=False)
    _page_server: UffdBackend | None = attrs.field(default=None, repr=False)
    _heartbeats: int = attrs.field(default=0, repr=False)
    _heartbeat_event: trio.Event = attrs.field(factory=trio.Event, repr=False)
    _failed: trio.Event = attrs.field(factory=trio.Event, repr=False)
    _closed: bool = False

    # --- construction (worker thread) -------------------------------------

    @classmethod
    def _open(
        cls,
        vm_id: str,
        vcpu_count: int,
        memory: GuestMemory,
        track_dirty_pages: bool,
    ) -> tuple[Kvm, KvmVm, list[Vcpu]]:
        kvm = Kvm.open()
        try:
            if vcpu_count > kvm.max_vcpus:
                raise InvalidVmConfig(
                    vm_id,
                    f"vcpu_count {vcpu_count} exceeds the {kvm.max_vcpus} vCPUs KVM allows here",
                )
            kvm_vm = KvmVm.create(kvm)
            try:
                kvm_vm.setup_x86()
                for slot, region in enumerate(memory.regions):
                    kvm_vm.set_memory_region(
                        slot,
                        region.guest_addr,
                        region.size,
                        region.host_addr,
                        log_dirty=track_dirty_pages,
                    )
                vcpus: list[Vcpu] = []
                try:
                    for index in range(vcpu_count):
                        vcpus.append(Vcpu.create(kvm_vm, index))
                except BaseException:
                    for vcpu in vcpus:
                        vcpu.close()
                    raise
            except BaseException:
                kvm_vm.close()
                raise
        except BaseException:
            kvm.close()
            raise
        return kvm, kvm_vm, vcpus

    @classmethod
    def create(
        cls,
        vm_id: str,
        vcpu_count: int,
        mem_size_mib: int,
        track_dirty_pages: bool,
        guest: GuestSpec,
        *,
        token: trio.lowlevel.TrioToken,
        quiesce_timeout_s: float,
    ) -> Vm:
        """A fresh VM running ``guest`` (NotStarted). Blocking: call from a worker thread.

        Raises:
            InvalidVmConfig: bad vCPU count, memory size or guest program.
        """
        _check_config(vm_id, vcpu_count, mem_size_mib)
        memory = GuestMemory.create(mem_size_mib, name=f"squibd-{vm_id}")
        try:
            try:
                image = kvm_guest.build_guest(memory, guest.program, dict(guest.params), vcpu_count)
            except (ValueError, KeyError) as error:
                raise InvalidVmConfig(vm_id, f"guest {guest.program!r}: {error}") from error
            kvm, kvm_vm, vcpus = cls._open(vm_id, vcpu_count, memory, track_dirty_pages)
            try:
                for vcpu in vcpus:
                    image.setup_vcpu(vcpu)
            except BaseException:
                for vcpu in vcpus:
                    vcpu.close()
                kvm_vm.close()
                kvm.close()
                raise
        except BaseException:
            memory.close()
            raise
        progress = tuple(image.progress_addr(i) for i in range(vcpu_count))
        spec = GuestSpec(image.program, dict(image.params))
        return cls._assemble(
            vm_id, vcpu_count, mem_size_mib, track_dirty_pages, spec, memory,
            kvm, kvm_vm, vcpus, progress, token=token, quiesce_timeout_s=quiesce_timeout_s,
        )  # fmt: skip

    @classmethod
    def restore(
        cls,
        vm_id: str,
        info: VmInfo,
        vm_state: X86VmState,
        vcpu_states: Sequence[X86VcpuState],
        memory: GuestMemory,
        *,
        track_dirty_pages: bool,
        token: trio.lowlevel.TrioToken,
        quiesce_timeout_s: float,
    ) -> Vm:
        """A VM rebuilt from captured state on ``memory`` (Paused, threads not started).

        VM-level state is restored before vCPU state (KVM-NOTES). The caller
        keeps ownership of ``memory`` if this raises. Blocking.
        """
        _check_config(vm_id, info.vcpu_count, info.mem_size_mib)
        if len(vcpu_states) != info.vcpu_count:
            raise InvalidVmConfig(
                vm_id, f"state has {len(vcpu_states)} vCPU states for {info.vcpu_count} vCPUs"
            )
        kvm, kvm_vm, vcpus = cls._open(vm_id, info.vcpu_count, memory, track_dirty_pages)
        try:
            kvm_vm.restore_vm_state(vm_state)
            for vcpu, vcpu_state in zip(vcpus, vcpu_states, strict=True):
                vcpu.restore(vcpu_state)
        except BaseException:
            for vcpu in vcpus:
                vcpu.close()
            kvm_vm.close()
            kvm.close()
            raise
        guest = (
            GuestSpec(info.guest_program, dict(info.guest_params))
            if info.guest_program is not None
            else None
        )
        progress: tuple[int, ...] = ()
        if guest is not None:
            progress = tuple(
                kvm_guest.progress_addr(guest.program, dict(guest.params), i)
                for i in range(info.vcpu_count)
            )
        vm = cls._assemble(
            vm_id, info.vcpu_count, info.mem_size_mib, track_dirty_pages, guest, memory,
            kvm, kvm_vm, vcpus, progress, token=token, quiesce_timeout_s=quiesce_timeout_s,
        )  # fmt: skip
        vm.state = VmState.PAUSED
        return vm

    @classmethod
    def _assemble(
        cls,
        vm_id: str,
        vcpu_count: int,
        mem_size_mib: int,
        track_dirty_pages: bool,
        guest: GuestSpec | None,
        memory: GuestMemory,
        kvm: Kvm,
        kvm_vm: KvmVm,
        vcpus: list[Vcpu],
        progress: tuple[int, ...],
        *,
        token: trio.lowlevel.TrioToken,
        quiesce_timeout_s: float,
    ) -> Vm:
        vm = cls(
            vm_id=vm_id,
            vcpu_count=vcpu_count,
            mem_size_mib=mem_size_mib,
            track_dirty_pages=track_dirty_pages,
            guest=guest,
            memory=memory,
            quiesce_timeout_s=quiesce_timeout_s,
            kvm=kvm,
            kvm_vm=kvm_vm,
            vcpus=vcpus,
            gate=VcpuGate(vcpu_count, token),
            progress_addrs=progress,
        )
        vm._log_enabled = track_dirty_pages
        if track_dirty_pages:
            vm._dirty = [DirtyBitmap(region.size) for region in memory.regions]
        vm._runners = [
            VcpuRunner(
                vcpu,
                io_handler=vm._io_from_thread,
                on_paused=vm._gate.on_paused_from_thread,
                on_exit_error=vm._exit_error_from_thread,
            )
            for vcpu in vcpus
        ]
        vm._gate.attach(vm._runners)
        return vm

    # --- lifecycle (trio thread) ------------------------------------------

    def start(self) -> None:
        """Start the vCPU threads (NotStarted or freshly restored -> Running)."""
        for runner in self._runners:
            runner.start()
        if self._page_server is not None:
            self._page_server.start_monitor(self._page_server_dead_from_thread)
        self.state = VmState.RUNNING

    async def pause(self) -> None:
        """Quiesce every vCPU (SPEC section 6); Running -> Paused.

        Raises:
            QuiesceTimeout: a vCPU did not ack; the VM keeps running.
        """
        await quiesce(self._gate, self.quiesce_timeout_s)
        self.state = VmState.PAUSED

    def resume(self) -> None:
        """Paused -> Running (starts the threads of a restored VM)."""
        if not self._runners or not self._runners[0].started:
            self.start()
            return
        self._gate.resume_all()
        self.state = VmState.RUNNING

    # --- vCPU thread callbacks --------------------------------------------

    def _io_from_thread(self, port: int, size: int, is_write: bool, data: bytes) -> bytes | None:
        if port == kvm_guest.HEARTBEAT_PORT:
            with contextlib.suppress(trio.RunFinishedError):
                self._gate.token.run_sync_soon(self._heartbeat)
        return None

    def _heartbeat(self) -> None:
        self._heartbeats += 1
        self._heartbeat_event.set()
        self._heartbeat_event = trio.Event()

    async def wait_failed(self) -> None:
        """Wait until the VM enters the error state (``error`` is then set)."""
        await self._failed.wait()

    async def wait_heartbeats(self, count: int = 1) -> None:
        """Wait until the guest program has sent ``count`` more heartbeats.

        A heartbeat proves that a vCPU made progress since the call (the
        programs send one every so many iterations). Bound it with a trio
        timeout; a paused VM sends none.
        """
        target = self._heartbeats + count
        while self._heartbeats < target:
            await self._heartbeat_event.wait()

    def _exit_error_from_thread(self, index: int, message: str) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._gate.token.run_sync_soon(self._enter_error, index, message)

    def _enter_error(self, index: int, message: str) -> None:
        if self.error is None:
            self.error = message if index < 0 else f"vCPU {index} stopped: {message}"
            self._failed.set()
        if self.state is VmState.RUNNING:
            self._gate.request_pause_all()  # park the others; nothing waits for them
            self.state = VmState.PAUSED

    # --- state and dirty set (worker threads) -----------------------------

    def capture_state(self) -> CapturedState:
        """Capture VM-level and vCPU state; every vCPU must be parked."""
        return CapturedState(
            vm_state=self._kvm_vm.capture_vm_state(),
            vcpu_states=tuple(vcpu.capture() for vcpu in self._vcpus),
        )

    @property
    def dirty_logging(self) -> bool:
        """Whether the KVM slots log dirty pages now."""
        return self._log_enabled

    def set_dirty_logging(self, enabled: bool) -> None:
        """Turn KVM dirty logging of every slot on or off (a live save of an untracked VM)."""
        if enabled == self._log_enabled:
            return
        for slot in range(len(self.memory.regions)):
            self._kvm_vm.set_dirty_logging(slot, enabled)
        self._log_enabled = enabled

    def harvest_kvm(self) -> list[Words]:
        """Fetch and reset the KVM dirty log of every slot; OR it into the dirty set.

        Returns the raw words per region (what was dirtied since the last harvest).
        """
        harvested: list[Words] = []
        for slot in range(len(self.memory.regions)):
            words = np.asarray(self._kvm_vm.harvest_dirty_log(slot), dtype=np.uint64)
            if self._dirty:
                self._dirty[slot].merge_kvm(words)
            harvested.append(words)
        return harvested

    def harvest_dirty(self) -> list[Words] | None:
        """Harvest KVM, then copy the dirty set (None when the VM does not track)."""
        if not self._log_enabled:
            return None
        self.harvest_kvm()
        return self.dirty_words()

    def dirty_words(self) -> list[Words] | None:
        """A copy of the dirty set's words per region (None when not tracking)."""
        if not self._dirty:
            return None
        return [bitmap.snapshot_words() for bitmap in self._dirty]

    @staticmethod
    def runs_of(words: Sequence[Words] | None) -> list[list[Run]]:
        """Dirty runs ``(first_page, npages)`` per region."""
        if words is None:
            return []
        return [runs_from_words(region_words) for region_words in words]

    def clear_dirty(self, saved: Sequence[Words] | None) -> None:
        """Clear exactly the saved words (after a commit)."""
        if saved is None or not self._dirty:
            return
        for bitmap, words in zip(self._dirty, saved, strict=True):
            bitmap.clear_words(words)

    def dirty_page_count(self) -> int:
        """Pages in the dirty set (0 when not tracking)."""
        return sum(bitmap.dirty_count() for bitmap in self._dirty)

    def region_sources(self) -> list[RegionSource]:
        """The regions as the memory writer reads them (a ``GuestRegion`` is a source)."""
        return list(self.memory.regions)

    @property
    def page_size(self) -> int:
        """The host page (dirty tracking and memory file granule)."""
        return PAGE_SIZE

    # --- memory access ----------------------------------------------------

    def write_memory(self, guest_addr: int, data: bytes) -> None:
        """Write guest RAM as an emulated device; the pages become dirty.

        KVM does not log writes made from userspace, so squibd marks them in
        the dirty set, and in the journal of a live save in progress.
        """
        region = self.memory.region_at(guest_addr, len(data))
        self.memory.write(guest_addr, data)
        index = self.memory.regions.index(region)
        offset = guest_addr - region.guest_addr
        if self._dirty:
            self._dirty[index].mark_addr(offset, len(data))
        journal = self._journal
        if journal is not None:
            journal[index].mark_addr(offset, len(data))

    def begin_write_journal(self) -> None:
        """Start recording squibd's own writes (a live save's final pass includes them)."""
        self._journal = [DirtyBitmap(region.size) for region in self.memory.regions]

    def journal_words(self) -> list[Words] | None:
        """The journal's words per region (None when no journal runs)."""
        journal = self._journal
        if journal is None:
            return None
        return [bitmap.snapshot_words() for bitmap in journal]

    def end_write_journal(self) -> None:
        """Stop recording squibd's own writes."""
        self._journal = None

    def arm_stall(self, index: int) -> None:
        """Hold vCPU ``index`` in userspace at its next exit (it then cannot ack a pause)."""
        self._runners[index].arm_stall(kick=True)

    def wait_stalled(self, index: int, timeout_s: float) -> bool:
        """Block (worker thread) until vCPU ``index`` is held by the stall hook."""
        return self._runners[index].wait_stalled(timeout_s)

    def release_stall(self, index: int) -> None:
        """Let a stalled vCPU continue."""
        self._runners[index].release_stall()

    def request_stall(self, index: int) -> None:
        """Ask vCPU ``index``'s built-in program to write once to the stall port.

        With the runner's stall hook armed, that vCPU then blocks in
        userspace and cannot acknowledge a quiesce (tests use this).
        """
        if self.guest is None:
            raise InvalidVmConfig(self.vm_id, "only built-in guest programs can be stalled")
        addr = kvm_guest.control_addr(self.guest.program, self.guest.params, index)
        self.write_memory(addr, _U64.pack(1))

    def guest_progress(self) -> list[int]:
        """Each vCPU's progress counter (empty without a built-in program)."""
        return [_U64.unpack(self.memory.read(addr, _U64.size))[0] for addr in self._progress_addrs]

    # --- reporting --------------------------------------------------------

    def vm_info(self) -> VmInfo:
        """How the VM was created, for the state file."""
        return VmInfo(
            mem_size_mib=self.mem_size_mib,
            vcpu_count=self.vcpu_count,
            track_dirty_pages=self.track_dirty_pages,
            guest_program=self.guest.program if self.guest else None,
            guest_params=dict(self.guest.params) if self.guest else {},
        )

    def describe(self) -> VmDescription:
        """A snapshot of what the VM is and does."""
        return VmDescription(
            vm_id=self.vm_id,
            state=str(self.state),
            vcpu_count=self.vcpu_count,
            mem_size_mib=self.mem_size_mib,
            track_dirty_pages=self.track_dirty_pages,
            guest_program=self.guest.program if self.guest else None,
            # A VM in the error state may have lost its page server: reading
            # its memory could block forever, so report no progress then.
            guest_progress=[] if self._closed or self.error else self.guest_progress(),
            error=self.error,
            last_pair_id=self.last_pair_id,
        )

    def attach_page_server(self, backend: UffdBackend) -> None:
        """Serve this VM's memory from ``backend``; closed after the vCPUs stop.

        Its death (watched once the vCPUs start) puts the VM in the error state.
        """
        self._page_server = backend
        self._resources.append(backend)

    def _page_server_dead_from_thread(self, reason: str) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._gate.token.run_sync_soon(self._enter_error, -1, f"page server died: {reason}")

    # --- teardown (worker thread) -----------------------------------------

    def close(self) -> None:
        """Stop and join the vCPU threads, then release KVM objects and RAM (idempotent)."""
        if self._closed:
            return
        self._closed = True
        for runner in self._runners:
            runner.stop()
        for runner in self._runners:
            runner.join()
        for vcpu in self._vcpus:
            vcpu.close()
        for resource in self._resources:
            resource.close()
        self._kvm_vm.close()
        self._kvm.close()
        self.memory.close()

