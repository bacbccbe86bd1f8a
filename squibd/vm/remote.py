"""``RemoteVm``: a VM that runs in its own VM process (issue 11).

It offers what the runtime, save, live-save and load code use of ``Vm``
(``machine.py``), so that code does not care where the vCPUs run. The VM
process (``squibd.vmm.process``) owns KVM and the vCPU threads; this object
holds the daemon's side:

- guest memory. For a fresh VM the daemon creates the memfds, maps them
  ``MAP_SHARED`` and passes them to the process (SCM_RIGHTS): saves stream
  pages from the daemon's own mapping while the guest runs. For a File
  restore the process maps the memory file ``MAP_PRIVATE`` (what keeps a
  load fast); the daemon maps the same file privately as a *shadow* and,
  after each harvest of the KVM dirty log (always on for such a VM), copies
  the pages the guest wrote from the process (``process_vm_readv``). Pages
  never harvested still equal the file, so the shadow reads as the guest's
  memory at every harvest made while the vCPUs are parked, which is when
  the savers read it;
- the dirty set (``dirty.py``), fed by the harvests the process returns;
- the lifecycle state. Quiesce waits for the process's answer under the
  caller's cancel scope; on timeout or cancellation it tells the process
  to resume (``quiesce_timeout_s``, SPEC section 6).

A pause during a save (the runtime marks the VM ``busy``; nothing else
pauses a busy VM) saves round trips in the pause window when the process
offers protocol revision 1: the ``pause`` asks for the dirty log harvested
as the last vCPU parks, and a ``capture`` is sent as soon as it answers,
which the process answers while the daemon writes. The save's next
harvest and capture take these *prefetched* answers, as long as the VM has
not been resumed since (a resume voids the capture; harvested words are
never dropped: the next harvest merges them). :meth:`RemoteVm.harvest_kvm_ready`
and :meth:`RemoteVm.capture_ready` hand them over on trio's thread, so that
the live save's final pass spends no worker-thread round trip on them.

The death of the process (its socket closes) puts the VM in the error state
with the cause the zygote reports (``describe_status``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
import numpy as np
import trio

from ..kvm import guest as kvm_guest
from ..snapshot.bitmap import Words
from ..snapshot.codec import make_state_converter
from ..snapshot.errors import QuiesceTimeout
from ..snapshot.memwriter import RegionSource
from ..snapshot.models import VmInfo, X86VcpuState, X86VmState
from ..uffd import UffdBackend, UffdError
from ..vmm.channel import Channel
from ..vmm.host import Connection, Reply, RequestFailed, ZygoteHost, describe_status
from ..vmm.protocol import Message, ProtocolError, pack_dirty_words, unpack_dirty_words
from ..vmm.statedir import vm_log_path
from .dirty import DirtySet, or_words, runs_of
from .errors import GuestMemoryUnavailable, InvalidVmConfig, VmFailed
from .guest_access import GuestAccess, ProgressProbe, ProgressReading
from .machine import PAGE_SIZE, CapturedState
from .memory import MIB, GuestMemory, layout_name
from .models import GuestSpec, VmDescription, VmState, describe_vm, vm_info_of

__all__ = ["RemoteVm", "attach_remote", "spawn_remote"]

_log = logging.getLogger(__name__)
_U64: Final = struct.Struct("<Q")
_CONVERTER: Final = make_state_converter(detailed_validation=False)
# cattrs generates its hooks on first use: do it here, once, so that a VM
# process forked from the warm zygote does not pay for it on every load.
for _cls in (X86VmState, X86VcpuState):
    _CONVERTER.get_structure_hook(_cls)
    _CONVERTER.get_unstructure_hook(_cls)
#: How long a closing VM process gets to exit after ``shutdown`` before SIGKILL.
_SHUTDOWN_GRACE_S: Final = 5.0
_IOV_MAX: Final = 1024
#: How long a restarted daemon waits for a VM process it re-attaches to answer.
_ATTACH_TIMEOUT_S: Final = 5.0

_libc = ctypes.CDLL(None, use_errno=True)
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


def _vm_copy(pid: int, local: Sequence[int], remote: Sequence[int], lengths: Sequence[int],
             *, write: bool) -> None:  # fmt: skip
    """Copy between this process and ``pid`` (``process_vm_readv``/``writev``; GIL released)."""
    fn = _libc.process_vm_writev if write else _libc.process_vm_readv
    for start in range(0, len(lengths), _IOV_MAX):
        count = min(_IOV_MAX, len(lengths) - start)
        local_iov = np.empty((count, 2), dtype=np.uint64)
        remote_iov = np.empty((count, 2), dtype=np.uint64)
        local_iov[:, 0] = local[start : start + count]
        remote_iov[:, 0] = remote[start : start + count]
        local_iov[:, 1] = remote_iov[:, 1] = lengths[start : start + count]
        want = int(remote_iov[:, 1].sum())
        done = fn(
            pid,
            local_iov.ctypes.data_as(ctypes.c_void_p), count,
            remote_iov.ctypes.data_as(ctypes.c_void_p), count, 0,
        )  # fmt: skip
        if done != want:
            err = ctypes.get_errno()
            raise OSError(err, f"process_vm copy with VM process {pid}: {os.strerror(err)}")


class _ProcessAccess(GuestAccess):
    """Guest memory read and written inside the VM process (private mappings)."""

    pid: int = 0
    host_addrs: tuple[int, ...] = ()

    def _remote(self, guest_addr: int, length: int) -> int:
        region = self.memory.region_at(guest_addr, length)
        index = self.memory.regions.index(region)
        return self.host_addrs[index] + guest_addr - region.guest_addr

    def read(self, guest_addr: int, length: int) -> bytes:
        buffer = ctypes.create_string_buffer(length)
        with self._inside():
            _vm_copy(self.pid, [ctypes.addressof(buffer)], [self._remote(guest_addr, length)],
                     [length], write=False)  # fmt: skip
        return buffer.raw

    def write(self, guest_addr: int, data: bytes) -> None:
        buffer = ctypes.create_string_buffer(data, len(data))
        with self._inside():
            _vm_copy(self.pid, [ctypes.addressof(buffer)], [self._remote(guest_addr, len(data))],
                     [len(data)], write=True)  # fmt: skip
        super().write(guest_addr, data)  # keep the shadow equal


@attrs.define(eq=False)
class RemoteVm:
    """A VM run by its own VM process (see the module doc)."""

    vm_id: str
    track_dirty_pages: bool
    guest: GuestSpec | None
    memory: GuestMemory = attrs.field(repr=False)
    quiesce_timeout_s: float
    process_id: int
    _conn: Connection = attrs.field(repr=False)
    _vcpu_count: int
    _host_addrs: tuple[int, ...] = attrs.field(repr=False)
    _progress_addrs: tuple[int, ...] = attrs.field(repr=False)
    #: The process maps a memory file privately: ``memory`` is a shadow (module doc).
    shadowed: bool = False
    #: A page server serves the process's memory (a Uffd load): the shadow starts
    #: empty and is filled whole before the first Full save (``populate_lazy``).
    page_served: bool = False
    _unsynced: bool = attrs.field(init=False, default=False, repr=False)
    _resync_on_harvest: bool = attrs.field(init=False, default=False, repr=False)
    _host: ZygoteHost | None = attrs.field(default=None, repr=False)
    _state_files: tuple[str, ...] = attrs.field(default=(), repr=False)
    dirty: DirtySet = attrs.field(init=False, repr=False)
    state: VmState = VmState.NOT_STARTED
    error: str | None = None
    busy: str | None = None
    _last_pair_id: str | None = attrs.field(default=None, repr=False)
    _log_enabled: bool = attrs.field(init=False)
    _resources: list[Any] = attrs.field(factory=list, repr=False)
    _failed: trio.Event = attrs.field(factory=trio.Event, repr=False)
    _closed: bool = False
    _detached: bool = False
    _token: trio.lowlevel.TrioToken = attrs.field(
        factory=trio.lowlevel.current_trio_token, repr=False
    )
    _access: GuestAccess = attrs.field(init=False, repr=False)
    _probe: ProgressProbe = attrs.field(init=False, repr=False)
    #: The protocol revision the process offers (``protocol/vmm.md``).
    revision: int = 0
    _prefetch_lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)
    #: Dirty words harvested by pauses and not taken by a harvest yet.
    _prefetched_words: list[Words] | None = attrs.field(default=None, init=False, repr=False)
    #: The capture asked for right after the last pause (void once resumed).
    _prefetched_capture: Reply | None = attrs.field(default=None, init=False, repr=False)
    #: No resume since the pause that harvested ``_prefetched_words``.
    _prefetch_current: bool = attrs.field(default=False, init=False, repr=False)
    memory_limiter: trio.CapacityLimiter = attrs.field(
        init=False, repr=False, factory=lambda: trio.CapacityLimiter(1)
    )

    def __attrs_post_init__(self) -> None:
        self._unsynced = self.page_served
        self._log_enabled = self.track_dirty_pages
        sizes = tuple(region.size for region in self.memory.regions)
        if self.revision >= 2 and self.track_dirty_pages:
            self.dirty = _MirroredDirtySet(sizes, True, mirror=self._conn.send)
        else:
            self.dirty = DirtySet(sizes, self.track_dirty_pages)
        if self.shadowed:
            access = _ProcessAccess(self.vm_id, self.memory)
            access.pid = self.process_id
            access.host_addrs = self._host_addrs
            self._access = access
        else:
            self._access = GuestAccess(self.vm_id, self.memory)
        self._probe = ProgressProbe(self._access, self._progress_addrs, self._token)

    def connect(self) -> None:
        """Wire the connection's events to this VM and start reading."""
        self._conn._on_event = self._event_from_thread
        self._conn._on_closed = self._closed_from_thread
        self._conn.start(self._token)

    # --- shape -----------------------------------------------------------

    @property
    def vcpu_count(self) -> int:
        """Number of vCPUs."""
        return self._vcpu_count

    @property
    def mem_size_mib(self) -> int:
        """Guest RAM in MiB."""
        return self.memory.total_size // MIB

    @property
    def memory_layout(self) -> str:
        """The RAM layout's name (``memory.py``)."""
        return layout_name(self.memory.manifest_regions())

    @property
    def page_size(self) -> int:
        """The host page."""
        return PAGE_SIZE

    @property
    def last_pair_id(self) -> str | None:
        """pair_id of the last committed snapshot (kept by the process across a daemon restart)."""
        return self._last_pair_id

    @last_pair_id.setter
    def last_pair_id(self, value: str | None) -> None:
        self._last_pair_id = value
        if not self._closed:
            self._conn.send("note", notes={"last_pair_id": value})

    # --- lifecycle (trio thread) -----------------------------------------

    def start(self) -> None:
        """NotStarted -> Running."""
        self._conn.send("start")
        self.state = VmState.RUNNING

    async def pause(self) -> None:
        """Quiesce across the process boundary; Running -> Paused.

        During a save, also prefetches the harvest and the state (module doc).

        Raises:
            QuiesceTimeout: the process did not report every vCPU parked in
                ``quiesce_timeout_s``; it was told to resume.
            VmFailed: the VM process is gone.
        """
        prefetch = self.busy is not None and self.revision >= 1
        params: dict[str, Any] = {}
        if prefetch and self._log_enabled_in_process():
            params["harvest"] = True
        done = False
        try:
            with trio.move_on_after(self.quiesce_timeout_s):
                reply = self._conn.begin("pause", on_trio=True, **params)
                result = await reply.await_result()
                done = True
        except RequestFailed as error:
            self._conn.send("resume")
            raise VmFailed(self.vm_id, "pause", error.message) from error
        except BaseException:
            self._conn.send("resume")
            raise
        if not done:
            self._conn.send("resume")
            raise QuiesceTimeout(
                detail=f"the VM process did not report every vCPU parked within "
                f"{self.quiesce_timeout_s} s"
            )
        try:
            harvested_now = _words_of(result) if "dirty" in result or "words" in result else None
        except ProtocolError as error:
            text = self._lost_harvest(error)
            self._enter_error(text)
            raise VmFailed(self.vm_id, "pause", text) from error
        # Asked for only now (not pipelined behind the pause): its reply, and its
        # conversion by the reader, then come while the save writes, never
        # before this task has resumed (measured: that put ~0.6 ms in the pause).
        capture = self._conn.begin("capture", convert=_captured) if prefetch else None
        with self._prefetch_lock:
            if harvested_now is not None:
                harvested = harvested_now
                old = self._prefetched_words
                self._prefetched_words = harvested if old is None else _or_all(old, harvested)
            self._prefetched_capture = capture
            self._prefetch_current = True
        self.state = VmState.PAUSED

    def _log_enabled_in_process(self) -> bool:
        # The process logs when the savers want it, and always for a private mapping.
        return self._log_enabled or self.shadowed

    def resume(self) -> None:
        """Paused -> Running (a VM in the error state stays parked)."""
        if self.error is not None:
            return
        with self._prefetch_lock:
            self._prefetch_current = False
            self._prefetched_capture = None
        self._conn.send("resume")
        self.state = VmState.RUNNING

    async def wait_failed(self) -> None:
        """Wait until the VM enters the error state."""
        await self._failed.wait()

    async def wait_heartbeats(self, count: int = 1) -> None:
        """Wait for ``count`` more heartbeats of the guest program."""
        await self._conn.acall("wait_heartbeats", count=count)

    def _event_from_thread(self, message: Message) -> None:
        event = message.get("event")
        if event == "vcpu_error":
            text = f"vCPU {message['index']} stopped: {message['message']}"
        elif event == "failed":
            text = str(message["message"])
        else:
            return
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._enter_error, text)

    def _closed_from_thread(self, reason: str) -> None:
        if self._closed or self._detached:
            return
        status = self._host.wait_status(self.process_id) if self._host is not None else None
        if status is not None:
            text = f"VM process {self.process_id} {describe_status(status)}"
        else:
            text = f"VM process {self.process_id} is gone ({reason}; exit status unknown)"
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._enter_error, text)

    def _enter_error(self, text: str) -> None:
        if self.error is None:
            self.error = text
            self._failed.set()
        if self.state is VmState.RUNNING:
            self.state = VmState.PAUSED

    # --- state and dirty set (worker threads) ----------------------------

    def _call(self, op: str, **params: Any) -> Message:
        try:
            return self._conn.call(op, **params)
        except RequestFailed as error:
            if error.kind == "ProcessGone":
                raise VmFailed(self.vm_id, op, error.message) from error
            raise

    def capture_state(self) -> CapturedState:
        """VM-level and vCPU state (every vCPU parked); the prefetched one if current."""
        with self._prefetch_lock:
            pending = self._prefetched_capture if self._prefetch_current else None
            self._prefetched_capture = None
        if pending is not None:
            try:
                result = pending.wait()
            except RequestFailed as error:
                if error.kind == "ProcessGone":
                    raise VmFailed(self.vm_id, "capture", error.message) from error
                # e.g. PauseAbandoned: ask again below (and fail with the reason then).
            else:
                if isinstance(pending.converted, CapturedState):
                    return pending.converted
                return _captured(result)
        return _captured(self._call("capture"))

    @property
    def dirty_logging(self) -> bool:
        """Whether KVM logs dirty pages for the savers now."""
        return self._log_enabled

    def set_dirty_logging(self, enabled: bool) -> None:
        """Turn KVM dirty logging on or off (a shadowed VM's stays on)."""
        if enabled != self._log_enabled:
            self._call("set_dirty_logging", enabled=enabled)
            self._log_enabled = enabled

    def _harvest(self) -> list[Words]:
        if self._resync_on_harvest:
            self._full_sync()
        with self._prefetch_lock:
            prefetched, current = self._prefetched_words, self._prefetch_current
            self._prefetched_words = None
        if prefetched is not None and current:
            words = prefetched  # parked since: the log has nothing newer
        else:
            params = {"sparse": True} if self.revision >= 1 else {}
            try:
                words = _words_of(self._call("harvest", **params))
            except ProtocolError as error:
                text = self._lost_harvest(error)
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(self._enter_error, text)
                raise VmFailed(self.vm_id, "harvest", text) from error
            if prefetched is not None:
                words = _or_all(prefetched, words)
        if self.shadowed:
            self._sync_shadow(words)
        return words

    def harvest_kvm_ready(self) -> list[Words] | None:
        """:meth:`harvest_kvm` without blocking, when a save's pause prefetched it (trio thread).

        None when the harvest needs a request or a copy from the process
        (nothing current prefetched, or a shadowed VM): call
        :meth:`harvest_kvm` in a worker thread then.
        """
        if self.shadowed or self._resync_on_harvest:
            return None
        with self._prefetch_lock:
            words = self._prefetched_words
            if words is None or not self._prefetch_current:
                return None
            self._prefetched_words = None
        for slot, slot_words in enumerate(words):
            self.dirty.merge_kvm(slot, slot_words)
        return words

    def capture_ready(self) -> CapturedState | None:
        """:meth:`capture_state` without blocking, once the prefetched capture is in (trio thread).

        None when it is not (yet): call :meth:`capture_state` in a worker thread then.
        """
        with self._prefetch_lock:
            pending = self._prefetched_capture if self._prefetch_current else None
            if pending is None or not pending.done:
                return None
            if not isinstance(pending.converted, CapturedState):
                return None  # failed or not converted: capture_state sorts it out
            self._prefetched_capture = None
            return pending.converted

    def _all_dirty(self) -> None:
        """Count every page as dirty (what was written is not known)."""
        for index, region in enumerate(self.memory.regions):
            self.dirty.mark(index, 0, region.size)

    def _lost_harvest(self, error: ProtocolError) -> str:
        """A harvest came malformed (the KVM log was reset): every page counts as dirty."""
        self._all_dirty()
        self._resync_on_harvest = self.shadowed
        return f"VM process {self.process_id} sent a malformed dirty log: {error}"

    def harvest_kvm(self) -> list[Words]:
        """Fetch and reset the KVM dirty log (in the process); OR it into the dirty set."""
        harvested = self._harvest()
        for slot, words in enumerate(harvested):
            self.dirty.merge_kvm(slot, words)
        return harvested

    def harvest_dirty(self) -> list[Words] | None:
        """Harvest, then copy the dirty set (None when the VM does not track)."""
        if not self._log_enabled:
            if self.shadowed:
                self._harvest()
            return None
        self.harvest_kvm()
        return self.dirty.words()

    def _full_sync(self) -> None:
        """Copy the whole memory from the process (blocking; a re-attached shadow)."""
        _vm_copy(
            self.process_id,
            [region.host_addr for region in self.memory.regions],
            list(self._host_addrs),
            [region.size for region in self.memory.regions],
            write=False,
        )
        self._unsynced = self._resync_on_harvest = False

    def _sync_shadow(self, words: Sequence[Words]) -> None:
        local: list[int] = []
        remote: list[int] = []
        lengths: list[int] = []
        for index, runs in enumerate(runs_of(words)):
            region = self.memory.regions[index]
            for first, count in runs:
                offset = int(first) * PAGE_SIZE
                local.append(region.host_addr + offset)
                remote.append(self._host_addrs[index] + offset)
                lengths.append(int(count) * PAGE_SIZE)
        if lengths:
            _vm_copy(self.process_id, local, remote, lengths, write=False)

    def region_sources(self) -> list[RegionSource]:
        """The regions as the memory writer reads them (the daemon's own mapping)."""
        return list(self.memory.regions)

    # --- memory access ---------------------------------------------------

    def write_memory(self, guest_addr: int, data: bytes) -> None:
        """Write guest RAM as a device; the pages become dirty (worker threads)."""
        region = self.memory.region_at(guest_addr, len(data))
        self._access.write(guest_addr, data)
        index = self.memory.regions.index(region)
        self.dirty.mark(index, guest_addr - region.guest_addr, len(data))

    def read_memory(self, guest_addr: int, length: int) -> bytes:
        """Read guest RAM (worker threads)."""
        return self._access.read(guest_addr, length)

    def guest_progress(self) -> list[int]:
        """Each vCPU's progress counter (blocking)."""
        return self._access.read_u64s(self._progress_addrs)

    async def read_progress(self, timeout_s: float) -> ProgressReading:
        """The progress counters, read in a worker thread for at most ``timeout_s``."""
        if self._closed or self.error is not None:
            return self._probe.cached()
        return await self._probe.read(timeout_s)

    def arm_stall(self, index: int) -> None:
        """Hold vCPU ``index`` in userspace at its next exit (tests)."""
        self._call("arm_stall", index=index)

    def wait_stalled(self, index: int, timeout_s: float) -> bool:
        """Block until vCPU ``index`` is held by the stall hook."""
        return bool(self._call("wait_stalled", index=index, timeout_s=timeout_s)["stalled"])

    def release_stall(self, index: int) -> None:
        """Let a stalled vCPU continue."""
        self._call("release_stall", index=index)

    def request_stall(self, index: int) -> None:
        """Ask vCPU ``index``'s built-in program to write once to the stall port."""
        if self.guest is None:
            raise InvalidVmConfig(self.vm_id, "only built-in guest programs can be stalled")
        addr = kvm_guest.control_addr(self.guest.program, self.guest.params, index)
        self.write_memory(addr, _U64.pack(1))

    # --- reporting -------------------------------------------------------

    def vm_info(self) -> VmInfo:
        """How the VM was created, for the state file."""
        return vm_info_of(self)

    def describe(self, progress: ProgressReading | None = None) -> VmDescription:
        """What the VM is and does (never touches guest memory)."""
        reading = progress if progress is not None else self._probe.cached()
        return describe_vm(self, str(self.state), reading.values, reading.stale, self.process_id)

    def attach_page_server(self, backend: UffdBackend) -> None:
        """Not supported across the process boundary (the runtime loads Uffd in-process)."""
        raise InvalidVmConfig(self.vm_id, "a Uffd restore runs in the daemon process")

    @property
    def lazy(self) -> bool:
        """Whether a page server serves this VM's memory (a Uffd load)."""
        return self.page_served

    async def populate_lazy(self, stall_s: float) -> None:
        """Fill the shadow of a Uffd-loaded VM whole, once, before its first Full save.

        Copies from the VM process in 16 MiB steps (each faults its pages in
        there, served by the page server), in a worker thread.

        Raises:
            GuestMemoryUnavailable: a step got nothing for ``stall_s`` (the
                thread is abandoned; it ends when the page is served or the
                VM process goes).
        """
        if not self._unsynced:
            return
        step = 16 * MIB
        for index, region in enumerate(self.memory.regions):
            for offset in range(0, region.size, step):
                length = min(step, region.size - offset)
                local = region.host_addr + offset
                remote = self._host_addrs[index] + offset

                def copy(local: int = local, remote: int = remote, length: int = length) -> None:
                    _vm_copy(self.process_id, [local], [remote], [length], write=False)

                with trio.move_on_after(stall_s):
                    await trio.to_thread.run_sync(copy, abandon_on_cancel=True)
                    continue
                raise GuestMemoryUnavailable(self.vm_id, stall_s)
        self._unsynced = False

    # --- teardown (worker thread) ----------------------------------------

    def close(self) -> None:
        """Stop the VM process and release the daemon's mapping (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self._conn.closed:
            if self.page_served:
                self._conn.send("release_lazy")
            self._conn.send("shutdown")
        if not self._conn.join(_SHUTDOWN_GRACE_S):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process_id, signal.SIGKILL)
            self._conn.close()
            self._conn.join(_SHUTDOWN_GRACE_S)
        self._conn.close()
        self._access.close(_SHUTDOWN_GRACE_S)
        self.memory.close()
        for path in self._state_files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def detach(self) -> None:
        """Let go of the VM process without stopping it (daemon exit, ``stop_vms_on_exit`` off)."""
        if self._closed:
            return
        self._closed = self._detached = True
        self._conn.close()
        self._conn.join(_SHUTDOWN_GRACE_S)
        self._access.close(_SHUTDOWN_GRACE_S)
        self.memory.close()


@attrs.define(eq=False)
class _MirroredDirtySet(DirtySet):
    """A dirty set whose marks and clears the VM process mirrors in its ledger (revision 2).

    Harvests need no message: the process adds what it harvests itself.
    """

    mirror: Callable[..., None] = attrs.field(kw_only=True, repr=False)

    def mark(self, region: int, offset: int, length: int) -> None:
        super().mark(region, offset, length)
        self.mirror("dirty_mark", region=region, offset=offset, length=length)

    def clear(self, saved: Sequence[Words] | None) -> None:
        super().clear(saved)
        if saved is not None:
            self.mirror("dirty_clear", dirty=[pack_dirty_words(words) for words in saved])


def _captured(result: Message) -> CapturedState:
    """The state of a ``capture`` result."""
    return CapturedState(
        vm_state=_CONVERTER.structure(result["vm_state"], X86VmState),
        vcpu_states=tuple(
            _CONVERTER.structure(plain, X86VcpuState) for plain in result["vcpu_states"]
        ),
    )


def _or_all(a: list[Words], b: list[Words]) -> list[Words]:
    merged = or_words(a, b)
    assert merged is not None
    return merged


def _words_of(result: Message) -> list[Words]:
    """The dirty words of a ``harvest`` (or ``pause``) result, per region (either form)."""
    if "dirty" in result:
        return [unpack_dirty_words(item) for item in result["dirty"]]
    return [np.frombuffer(chunk, dtype="<u8").astype(np.uint64) for chunk in result["words"]]


def _restore_dirty_set(vm: RemoteVm, ledger: Any) -> None:
    """Start a re-attached VM's dirty set from the process's ledger (revision 2).

    The ledger holds what the previous daemon harvested or wrote and did not
    commit in a snapshot: the next Diff takes just that (and what the guest
    writes from now on). Without a usable ledger every page counts as dirty
    (correct, not minimal).
    """
    if not vm.track_dirty_pages:
        return
    try:
        if ledger is None or len(ledger) != len(vm.memory.regions):
            raise ProtocolError("no ledger")
        for index, item in enumerate(ledger):
            vm.dirty.merge_kvm(index, unpack_dirty_words(item))
    except (ProtocolError, TypeError, ValueError):
        vm._all_dirty()


def _progress_addrs(guest: GuestSpec | None, vcpu_count: int) -> tuple[int, ...]:
    if guest is None:
        return ()
    return tuple(
        kvm_guest.progress_addr(guest.program, guest.params, i) for i in range(vcpu_count)
    )


@attrs.frozen
class StatePaths:
    """Where a VM process's re-attach socket and record live (None: no re-attach)."""

    socket: str | None = None
    record: str | None = None

    @classmethod
    def for_vm(cls, state_dir: str | None, vm_id: str) -> StatePaths:
        if state_dir is None:
            return cls()
        vms = os.path.join(state_dir, "vms")
        os.makedirs(vms, mode=0o700, exist_ok=True)
        # A socket path must fit sun_path: name it by a digest, not the vm_id.
        key = hashlib.sha256(vm_id.encode()).hexdigest()[:16]
        return cls(os.path.join(vms, f"{key}.sock"), os.path.join(vms, f"{key}.json"))

    def files(self) -> tuple[str, ...]:
        """What ``vm.destroy`` removes: the socket, the record and the VM process's log."""
        if self.socket is None or self.record is None:
            return ()
        return (self.socket, self.record, vm_log_path(self.socket))


def spawn_remote(
    host: ZygoteHost,
    vm_id: str,
    *,
    vcpu_count: int,
    track_dirty_pages: bool,
    guest: GuestSpec | None,
    memory: GuestMemory,
    shadow_file_fd: int | None,
    quiesce_timeout_s: float,
    token: trio.lowlevel.TrioToken,
    vm_state: X86VmState | None = None,
    vcpu_states: Sequence[X86VcpuState] | None = None,
    state_dir: str | None = None,
    confine: dict[str, Any] | None = None,
    page_server: tuple[str, str | None] | None = None,
) -> RemoteVm:
    """Start a VM process for ``memory`` (blocking; closes ``memory`` on failure).

    ``page_server``: ``(socket path, pair_id)`` of a Uffd load: the process
    registers its own memory with it; ``memory`` is the daemon's empty shadow.

    ``shadow_file_fd``: the memory file of a File restore (the process maps it
    privately; ``memory`` is then the daemon's shadow mapping of it). The fd is closed.
    """
    paths = StatePaths.for_vm(state_dir, vm_id)
    conn: Connection | None = None
    pid = 0
    try:
        pid, channel = host.spawn()
        conn = Connection(channel, on_event=lambda _m: None, on_closed=lambda _r: None)
        shared = shadow_file_fd is None and page_server is None
        fds: list[int | None] = (
            [r.fd for r in memory.regions if r.fd is not None] if shared else [shadow_file_fd]
        )
        kind = "shared" if shared else "private" if page_server is None else "uffd"
        message: dict[str, Any] = {
            "op": "init",
            "id": 1,
            "vm_id": vm_id,
            "vcpu_count": vcpu_count,
            "track_dirty_pages": track_dirty_pages,
            "regions": [[r.guest_addr, r.size, r.file_offset] for r in memory.regions],
            "memory": kind,
            "page_server": None if page_server is None else page_server[0],
            "pair_id": None if page_server is None else page_server[1],
            "guest": None if guest is None else {"program": guest.program,
                                                 "params": dict(guest.params)},
            "build_guest": vm_state is None,
            "listen": paths.socket,
            "confine": confine,
        }  # fmt: skip
        if vm_state is not None and vcpu_states is not None:
            message["vm_state"] = _CONVERTER.unstructure(vm_state, X86VmState)
            message["vcpu_states"] = [_CONVERTER.unstructure(s, X86VcpuState) for s in vcpu_states]
        channel.send(message, [fd for fd in fds if fd is not None])
        reply, _ = channel.receive()
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise _init_error(vm_id, str(err.get("type")), str(err.get("message")))
        result = reply["result"]
        vm = RemoteVm(
            vm_id=vm_id,
            track_dirty_pages=track_dirty_pages,
            guest=guest,
            memory=memory,
            quiesce_timeout_s=quiesce_timeout_s,
            process_id=pid,
            conn=conn,
            vcpu_count=vcpu_count,
            host_addrs=tuple(result["host_addrs"]),
            progress_addrs=_progress_addrs(guest, vcpu_count),
            shadowed=not shared,
            page_served=page_server is not None,
            host=host,
            state_files=paths.files(),
            token=token,
            revision=int(result.get("revision", 0)),
        )
    except BaseException:
        if conn is not None:
            conn.close()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        memory.close()
        raise
    finally:
        if shadow_file_fd is not None:
            os.close(shadow_file_fd)
    if vm_state is not None:
        vm.state = VmState.PAUSED
    if paths.record is not None:
        _write_record(paths.record, {"pid": pid, "vm_id": vm_id, "socket": paths.socket})
    vm.connect()
    return vm


def _write_record(path: str, record: dict[str, Any]) -> None:
    """Write a VM process's record atomically (what a restarted daemon looks for)."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _init_error(vm_id: str, kind: str, message: str) -> Exception:
    if kind in ("InvalidVmConfig", "GuestProgramError", "ValueError", "KeyError"):
        return InvalidVmConfig(vm_id, message)
    from .. import uffd

    error_class = getattr(uffd, kind, None)
    if isinstance(error_class, type) and issubclass(error_class, uffd.UffdError):
        # The page server's answer to the VM process, with its own message.
        error = error_class.__new__(error_class)
        Exception.__init__(error, message)
        return error
    if kind in ("KvmError", "VcpuLimitExceeded"):
        from ..kvm.errors import KvmError

        return KvmError(message)
    return RequestFailed(kind, message)


def find_records(state_dir: str) -> list[dict[str, Any]]:
    """The records of VM processes under ``state_dir`` (unreadable ones skipped)."""
    vms = os.path.join(state_dir, "vms")
    records: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError):
        for name in sorted(os.listdir(vms)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(vms, name), encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(record, dict):
                record["_path"] = os.path.join(vms, name)
                records.append(record)
    return records


def attach_remote(
    record: dict[str, Any], *, quiesce_timeout_s: float, token: trio.lowlevel.TrioToken
) -> RemoteVm | None:
    """Re-attach to the VM process a record names (blocking); None when it is gone.

    A record whose socket nobody answers is stale: it and its socket are removed.
    """
    sock_path = str(record.get("socket"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # A VM process answers one daemon at a time: one that is busy with another
    # (or hung) must not hold this daemon's start-up.
    sock.settimeout(_ATTACH_TIMEOUT_S)
    try:
        sock.connect(sock_path)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        for path in (sock_path, str(record["_path"])):
            with contextlib.suppress(OSError):
                os.unlink(path)
        log = vm_log_path(sock_path)
        if os.path.exists(log):  # kept: it may say why the process ended
            _log.warning("VM %s: its VM process ended while no daemon was attached; see %s",
                         record.get("vm_id"), log)  # fmt: skip
        return None
    except OSError as error:
        sock.close()
        _log.warning("VM process at %s does not answer (%s); not re-attached", sock_path, error)
        return None
    channel = Channel(sock)
    try:
        channel.send({"op": "attach", "id": 1})
        reply, fds = channel.receive()
    except Exception as error:
        channel.close()
        _log.warning("VM process at %s did not re-attach (%s)", sock_path, error)
        return None
    if not reply.get("ok"):
        channel.close()
        return None
    sock.settimeout(None)
    d = reply["result"]
    init = d["init"]
    from ..snapshot.manifest import MemoryRegion
    from ..vmm.process import map_memory

    regions = [MemoryRegion(*r) for r in init["regions"]]
    kind = init["memory"]
    if kind == "shared":
        memory = map_memory(regions, fds, shared=True)
    elif kind == "private":  # the process's memory file, mapped privately again
        memory = map_memory(regions, fds, shared=False)
    else:
        for fd in fds:
            os.close(fd)
        memory = GuestMemory.anonymous(regions)
    guest = None if init.get("guest") is None else GuestSpec(
        init["guest"]["program"], dict(init["guest"]["params"])
    )
    conn = Connection(channel, on_event=lambda _m: None, on_closed=lambda _r: None)
    vm = RemoteVm(
        vm_id=str(d["vm_id"]),
        track_dirty_pages=bool(init["track_dirty_pages"]),
        guest=guest,
        memory=memory,
        quiesce_timeout_s=quiesce_timeout_s,
        process_id=int(d["pid"]),
        conn=conn,
        vcpu_count=int(init["vcpu_count"]),
        host_addrs=tuple(d["host_addrs"]),
        progress_addrs=_progress_addrs(guest, int(init["vcpu_count"])),
        state_files=(sock_path, str(record["_path"]), vm_log_path(sock_path)),
        token=token,
        shadowed=kind != "shared",
        page_served=kind == "uffd",
        revision=int(d.get("revision", 0)),
    )
    if kind != "shared":
        # What the guest wrote before this daemon came is unknown here: the
        # first harvest copies the whole memory from the process first.
        vm._unsynced = vm._resync_on_harvest = True
    vm._last_pair_id = d["notes"].get("last_pair_id")
    _restore_dirty_set(vm, d.get("dirty"))
    vm._log_enabled = bool(d["log_enabled"])
    if d["error"] is not None:
        vm.error = str(d["error"])
        vm._failed.set()
    if not d["started"]:
        vm.state = VmState.NOT_STARTED
    elif d["paused"] or d["error"] is not None:
        vm.state = VmState.PAUSED
    else:
        vm.state = VmState.RUNNING
    vm.connect()
    return vm



@attrs.define(eq=False)
class ProcessVms:
    """How the runtime makes VM processes (``[server] vm_isolation = "process"``).

    Args:
        state_dir: private directory for re-attach sockets and records (None:
            VM processes end with the daemon's connection).
        confine: the privilege drop and seccomp settings passed to each VM
            process (``squibd.vmm.confine``; None: none).
    """

    state_dir: str | None = None
    confine: dict[str, Any] | None = None
    host: ZygoteHost = attrs.field(factory=ZygoteHost)
    """The zygote (the daemon passes one it started before any thread: ``untraced.py``)."""

    def warm(self) -> None:
        """Start the zygote and a spare VM process now, so that the first VM does not pay."""
        self.host.ensure_started()
        self.host.prefork()

    def fresh(
        self,
        vm_id: str,
        vcpu_count: int,
        mem_size_mib: int,
        track_dirty_pages: bool,
        guest: GuestSpec,
        *,
        token: trio.lowlevel.TrioToken,
        quiesce_timeout_s: float,
        memory_layout: str,
    ) -> RemoteVm:
        """A NotStarted VM in its own process, on fresh memfd RAM (blocking)."""
        from .memory import MemoryLayoutError

        try:
            memory = GuestMemory.create(mem_size_mib, name=f"squibd-{vm_id}", layout=memory_layout)
        except MemoryLayoutError as error:
            raise InvalidVmConfig(vm_id, str(error)) from error
        vm = spawn_remote(
            self.host, vm_id, vcpu_count=vcpu_count, track_dirty_pages=track_dirty_pages,
            guest=guest, memory=memory, shadow_file_fd=None,
            quiesce_timeout_s=quiesce_timeout_s, token=token,
            state_dir=self.state_dir, confine=self.confine,
        )  # fmt: skip
        return vm

    def restored(
        self,
        vm_id: str,
        info: VmInfo,
        vm_state: X86VmState,
        vcpu_states: Sequence[X86VcpuState],
        memory: GuestMemory,
        mem_path: str,
        *,
        track_dirty_pages: bool,
        token: trio.lowlevel.TrioToken,
        quiesce_timeout_s: float,
        lazy_pair_id: str | None = None,
    ) -> RemoteVm:
        """A Paused VM in its own process restored over memory file ``mem_path`` (blocking).

        ``memory`` is the daemon's private mapping of the file (the shadow);
        the caller keeps it if this raises. With ``lazy_pair_id`` (a Uffd
        load), ``mem_path`` is the page server's socket and ``memory`` an
        empty anonymous shadow.
        """
        fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC) if lazy_pair_id is None else None
        guest = None if info.guest_program is None else GuestSpec(
            info.guest_program, dict(info.guest_params)
        )
        try:
            return spawn_remote(
                self.host, vm_id, vcpu_count=info.vcpu_count,
                track_dirty_pages=track_dirty_pages, guest=guest, memory=memory,
                shadow_file_fd=fd, quiesce_timeout_s=quiesce_timeout_s, token=token,
                vm_state=vm_state, vcpu_states=vcpu_states,
                state_dir=self.state_dir, confine=self.confine,
                page_server=None if lazy_pair_id is None else (mem_path, lazy_pair_id),
            )  # fmt: skip
        except (InvalidVmConfig, UffdError):
            raise
        except RequestFailed as error:
            from ..kvm.errors import KvmError

            raise KvmError(error.message) from error

    def reattach(self, *, quiesce_timeout_s: float, token: trio.lowlevel.TrioToken
                 ) -> list[RemoteVm]:  # fmt: skip
        """Every VM process a previous daemon left under ``state_dir`` (blocking)."""
        if self.state_dir is None:
            return []
        found: list[RemoteVm] = []
        for record in find_records(self.state_dir):
            vm = attach_remote(record, quiesce_timeout_s=quiesce_timeout_s, token=token)
            if vm is not None:
                found.append(vm)
        return found

    def close(self) -> None:
        """Stop the zygote (VM processes carry on)."""
        self.host.close()
