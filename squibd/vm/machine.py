"""One VM: its KVM objects, guest memory, vCPU threads, dirty set and lifecycle.

A ``Vm`` is built (``build.py``) either fresh, running a built-in guest
program, or from a snapshot; building runs in a worker thread. The
lifecycle methods (``start``, ``pause``, ``resume``) run on the trio thread.
Blocking helpers of the save and load orchestration (``capture_state``,
``harvest_kvm``, ...) run in worker threads while the vCPUs are parked or,
for a live save's harvests, while they run.

Dirty set. For a VM with ``track_dirty_pages`` every memory slot carries
``KVM_MEM_LOG_DIRTY_PAGES``; KVM harvests (``harvest_kvm``) and squibd's own
writes (``write_memory``) feed the VM's ``DirtySet`` (``dirty.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import time
from typing import Final, Protocol

import attrs
import numpy as np
import trio

from ..kvm import guest as kvm_guest
from ..kvm.runner import VcpuRunner
from ..kvm.system import Kvm
from ..kvm.vcpu import Vcpu
from ..kvm.vm import KvmVm
from ..kvm.workdevice import WorkDevice
from ..snapshot.bitmap import Words
from ..snapshot.compat import MAX_VCPUS
from ..snapshot.memwriter import RegionSource
from ..snapshot.models import VmInfo, X86VcpuState, X86VmState
from ..uffd import UffdBackend
from .dirty import DirtySet
from .errors import InvalidVmConfig
from .guest_access import (
    GuestAccess,
    Populator,
    ProgressProbe,
    ProgressReading,
    release_lazy_pages,
)
from .memory import MIB, GuestMemory, layout_name
from .models import GuestSpec, VmDescription, VmState, describe_vm, vm_info_of
from .quiesce import VcpuGate, quiesce

__all__ = ["MAX_VCPUS", "PAGE_SIZE", "CapturedState", "Vm"]

#: SPEC section 1: the host page, read from the system.
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
#: Progress counters are little-endian u64 (the guest programs of squibd.kvm).
_U64: Final = struct.Struct("<Q")
#: Teardown: how long vCPU threads get to leave KVM_RUN before a lazy VM's
#: missing pages are released (their page server may never serve them).
_JOIN_GRACE_S: Final = 2.0
#: Teardown: how long stopping threads and memory accesses may take once
#: released; past it the VM's mappings are leaked rather than unmapped under
#: a thread (which would crash the daemon).
_TEARDOWN_TIMEOUT_S: Final = 30.0

_log = logging.getLogger(__name__)


class Closeable(Protocol):
    """Anything with a ``close()``: a resource the VM owns."""

    def close(self) -> None: ...


@attrs.frozen
class CapturedState:
    """vCPU and VM-level state captured while every vCPU was parked."""

    vm_state: X86VmState
    vcpu_states: tuple[X86VcpuState, ...]


@attrs.define(eq=False)
class Vm:
    """A VM run by squibd (see the module doc); ``build.py`` makes them."""

    vm_id: str
    track_dirty_pages: bool
    guest: GuestSpec | None
    memory: GuestMemory = attrs.field(repr=False)
    quiesce_timeout_s: float
    _kvm: Kvm = attrs.field(repr=False)
    _kvm_vm: KvmVm = attrs.field(repr=False)
    _vcpus: list[Vcpu] = attrs.field(repr=False)
    _gate: VcpuGate = attrs.field(repr=False)
    _progress_addrs: tuple[int, ...] = attrs.field(repr=False)
    #: Pages written since the last checkpoint (see ``dirty.py``).
    dirty: DirtySet = attrs.field(init=False, repr=False)
    state: VmState = VmState.NOT_STARTED
    #: Non-None once a vCPU failed (exit error); the VM then refuses to run.
    error: str | None = None
    #: Name of the long operation running on this VM (save, load), if any.
    busy: str | None = None
    #: pair_id of the last committed snapshot: the parent of the next Diff.
    last_pair_id: str | None = None
    _runners: list[VcpuRunner] = attrs.field(init=False, repr=False)
    #: Whether the memory slots currently carry KVM_MEM_LOG_DIRTY_PAGES.
    _log_enabled: bool = attrs.field(init=False)
    #: Extra resources closed with the VM after its vCPUs stop (a page-server session).
    _resources: list[Closeable] = attrs.field(factory=list, repr=False)
    _page_server: UffdBackend | None = attrs.field(default=None, repr=False)
    _heartbeats: int = attrs.field(default=0, repr=False)
    _heartbeat_event: trio.Event = attrs.field(factory=trio.Event, repr=False)
    _failed: trio.Event = attrs.field(factory=trio.Event, repr=False)
    _closed: bool = False
    #: Every access to guest memory from squibd itself (worker threads only).
    _access: GuestAccess = attrs.field(init=False, repr=False)
    _probe: ProgressProbe = attrs.field(init=False, repr=False)
    _populator: Populator = attrs.field(init=False, repr=False)
    #: Answers the ``exiter`` guest's work requests (vCPU threads).
    _work: WorkDevice = attrs.field(factory=WorkDevice, init=False, repr=False)
    #: One debug-API memory access (read/write_memory) at a time per VM.
    memory_limiter: trio.CapacityLimiter = attrs.field(
        init=False, repr=False, factory=lambda: trio.CapacityLimiter(1)
    )

    @property
    def vcpu_count(self) -> int:
        """Number of vCPUs."""
        return len(self._vcpus)

    @property
    def mem_size_mib(self) -> int:
        """Guest RAM in MiB (the regions' total)."""
        return self.memory.total_size // MIB

    @property
    def memory_layout(self) -> str:
        """The name of the RAM layout (``squibd`` or ``firecracker``; see ``memory.py``).

        Found from the regions, which a restored VM took from its state file's
        manifest (load checked them against the layout the file records).
        """
        return layout_name(self.memory.manifest_regions())

    def __attrs_post_init__(self) -> None:
        self._access = GuestAccess(self.vm_id, self.memory)
        self._probe = ProgressProbe(self._access, self._progress_addrs, self._gate.token)
        self._populator = Populator(self._access, self._gate.token)
        self._log_enabled = self.track_dirty_pages
        self.dirty = DirtySet(
            tuple(region.size for region in self.memory.regions), self.track_dirty_pages
        )
        self._runners = [
            VcpuRunner(
                vcpu,
                io_handler=self._io_from_thread,
                on_paused=self._gate.on_paused_from_thread,
                on_exit_error=self._exit_error_from_thread,
            )
            for vcpu in self._vcpus
        ]
        self._gate.attach(self._runners)

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
        """Paused -> Running (starts the threads of a restored VM).

        A VM in the error state stays parked (the runtime refuses to resume
        it; this also covers a save that fails after the error arrived).
        """
        if self.error is not None:
            return
        if not self._runners or not self._runners[0].started:
            self.start()
            return
        self._gate.resume_all()
        self.state = VmState.RUNNING

    # --- vCPU thread callbacks --------------------------------------------

    def _io_from_thread(self, port: int, size: int, is_write: bool, data: bytes) -> bytes | None:
        if port == kvm_guest.WORK_PORT and is_write:
            self._work.handle(data)
        elif port == kvm_guest.HEARTBEAT_PORT:
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
            # Park the other vCPUs. Straight on the runners, not through the
            # gate: a quiesce in progress keeps its own request and acks.
            for runner in self._runners:
                runner.request_pause()
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
            self.dirty.merge_kvm(slot, words)
            harvested.append(words)
        return harvested

    def harvest_dirty(self) -> list[Words] | None:
        """Harvest KVM, then copy the dirty set (None when the VM does not track)."""
        if not self._log_enabled:
            return None
        self.harvest_kvm()
        return self.dirty.words()

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

        Blocking (a lazy page waits for its page server): worker threads only.
        KVM does not log writes made from userspace, so squibd marks them itself.
        """
        region = self.memory.region_at(guest_addr, len(data))
        self._access.write(guest_addr, data)
        index = self.memory.regions.index(region)
        self.dirty.mark(index, guest_addr - region.guest_addr, len(data))

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

    def read_memory(self, guest_addr: int, length: int) -> bytes:
        """Read guest RAM. Blocking (a lazy page waits for its page server): worker threads only."""
        return self._access.read(guest_addr, length)

    def guest_progress(self) -> list[int]:
        """Each vCPU's progress counter (empty without a built-in program).

        Blocking, like :meth:`read_memory`: the daemon uses :meth:`read_progress`.
        """
        return self._access.read_u64s(self._progress_addrs)

    async def read_progress(self, timeout_s: float) -> ProgressReading:
        """The progress counters, read in a worker thread for at most ``timeout_s``.

        A VM in the error state may have lost its page server: its memory is
        not read then (the last known values are reported, stale).
        """
        if self._closed or self.error is not None:
            return self._probe.cached()
        return await self._probe.read(timeout_s)

    # --- reporting --------------------------------------------------------

    def vm_info(self) -> VmInfo:
        """How the VM was created, for the state file."""
        return vm_info_of(self)

    def describe(self, progress: ProgressReading | None = None) -> VmDescription:
        """What the VM is and does; ``progress`` from :meth:`read_progress` (else the last known).

        Never touches guest memory: safe on the trio thread.
        """
        reading = progress if progress is not None else self._probe.cached()
        return describe_vm(self, str(self.state), reading.values, reading.stale, os.getpid())

    def attach_page_server(self, backend: UffdBackend) -> None:
        """Serve this VM's memory from ``backend``; closed after the vCPUs stop.

        Its death (watched once the vCPUs start) puts the VM in the error state.
        """
        self._page_server = backend
        self._resources.append(backend)

    @property
    def lazy(self) -> bool:
        """Whether a page server serves this VM's memory (a Uffd load)."""
        return self._page_server is not None

    async def populate_lazy(self, stall_s: float) -> None:
        """Fault in all memory of a lazy VM (no-op otherwise), before a Full save reads it.

        The memory writer may hold the GIL while it scans pages: a missing
        page there would freeze the daemon until served. See ``guest_access.Populator``.

        Raises:
            GuestMemoryUnavailable: the page server served nothing for ``stall_s``.
        """
        if self._page_server is not None:
            await self._populator.run(stall_s)

    def _page_server_dead_from_thread(self, reason: str) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._gate.token.run_sync_soon(self._enter_error, -1, f"page server died: {reason}")

    # --- teardown (worker thread) -----------------------------------------

    def close(self) -> None:
        """Stop and join the vCPU threads, then release KVM objects and RAM (idempotent).

        Bounded even when a page server stalls: vCPU threads and memory
        accesses still waiting for a lazy page after ``_JOIN_GRACE_S`` are
        released by unregistering guest memory from userfaultfd (the pages
        then read as zeros; the VM is going away). A thread that still does
        not leave within ``_TEARDOWN_TIMEOUT_S`` keeps the VM's mappings and
        KVM fds (leaked, logged) instead of crashing the daemon.
        """
        if self._closed:
            return
        self._closed = True
        for runner in self._runners:
            runner.stop()
        stuck = not self._join_all(_JOIN_GRACE_S) or self._access.active > 0
        if stuck and self._page_server is not None:
            release_lazy_pages(self._page_server.uffd.fd, self.memory)
        idle = self._join_all(_TEARDOWN_TIMEOUT_S) and self._access.close(_TEARDOWN_TIMEOUT_S)
        for resource in self._resources:
            resource.close()
        if not idle:
            _log.error(
                "VM %r: a thread is still inside its memory or KVM_RUN after %s s; "
                "its memory and KVM objects are leaked rather than freed under it",
                self.vm_id, _TEARDOWN_TIMEOUT_S,
            )  # fmt: skip
            return
        for vcpu in self._vcpus:
            vcpu.close()
        self._kvm_vm.close()
        self._kvm.close()
        self.memory.close()

    def _join_all(self, timeout_s: float) -> bool:
        """Join every vCPU thread within ``timeout_s`` in total; True when all exited."""
        deadline = time.monotonic() + timeout_s
        for runner in self._runners:
            runner.join(max(0.0, deadline - time.monotonic()))
        return not any(runner.alive for runner in self._runners)

