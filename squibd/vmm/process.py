"""The VM process: one KVM VM, its vCPU threads and its guest-memory mapping.

Theory of operation
-------------------
The daemon (or the zygote, on its behalf) starts this with one end of a
Unix socket. The first request is ``init``: the VM's shape, its memory as
fds (one memfd per region, mapped ``MAP_SHARED``: the daemon maps the same
memfds and streams pages from its own mapping; or one memory file, mapped
``MAP_PRIVATE``, for a File restore), and either a built-in guest program
to write or the captured state to restore. The process then builds the KVM
VM, may drop privileges (``confine.py``), and serves requests until
``shutdown`` or until it is killed (``protocol/vmm.md`` lists them).

Requests are read by the main thread and answered in order, except
``pause`` (answered by the vCPU thread whose acknowledgement completes it,
with the dirty log harvested right there when asked), a ``capture`` that
arrives while a pause is under way (answered by the collector thread once
every vCPU is parked, so that the daemon can pipeline it behind ``pause``
and capture overlaps the daemon's work), and ``wait_stalled``/
``wait_heartbeats`` (answered when the condition holds). A ``resume``
waits for a capture in progress, and answers every pause or capture it
overtakes with ``PauseAbandoned``. A vCPU exit error is reported as a
``vcpu_error`` event.

The main thread (the control thread) runs at nice :data:`CONTROL_NICE`,
and only it (``SCHED_RESET_ON_FORK``: the vCPU and helper threads it starts
run at the default priority): it sleeps but for short requests, and on a
busy host the wake-up of the thread that receives ``pause`` is the tail of
the quiesce latency (``bench/vm_process.py``). Without the privilege to
raise it, it runs at the default priority.

With ``track_dirty_pages``, the process keeps a *ledger*: a mirror of the
daemon's dirty set (``squibd.vm.dirty``), fed by every harvest made here and
by the daemon's ``dirty_mark``/``dirty_clear`` (revision 2). It is a
superset of the daemon's set at every instant, so a daemon that re-attaches
starts its dirty set from it (``attach``), and its first Diff holds only
what changed since the last committed snapshot.

When the connection to the daemon ends and the VM has a ``listen`` path, the
process keeps running its guest and waits there for a new daemon (issue 11:
a daemon restart does not stop guests); otherwise it exits.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import numpy as np

from ..kvm import guest as kvm_guest
from ..kvm.runner import VcpuRunner, install_signal_handler
from ..kvm.system import Kvm
from ..kvm.vcpu import Vcpu
from ..kvm.vm import KvmVm
from ..kvm.workdevice import WorkDevice
from ..snapshot.codec import make_state_converter
from ..snapshot.manifest import MemoryRegion
from ..snapshot.models import X86VcpuState, X86VmState
from ..uffd import UffdBackend
from ..vm.build import _open_kvm, open_vm
from ..vm.dirty import DirtySet
from ..vm.errors import InvalidVmConfig
from ..vm.guest_access import release_lazy_pages
from ..vm.memory import GuestMemory, GuestRegion, _mapping_address
from .channel import Channel, ChannelClosed
from .protocol import (
    REVISION,
    Message,
    ProtocolError,
    error_reply,
    ok_reply,
    pack_dirty_words,
    unpack_dirty_words,
)
from .statedir import vm_log_path

__all__ = ["CONTROL_NICE", "VmServer", "main", "prioritise_control_thread", "serve_fd"]

_log = logging.getLogger(__name__)
_PROT_RW: Final = mmap.PROT_READ | mmap.PROT_WRITE
_MAP_NORESERVE: Final[int] = getattr(mmap, "MAP_NORESERVE", 0x4000)
#: Nice value of the VM process's control thread (module doc).
CONTROL_NICE: Final = -10
_CONVERTER: Final = make_state_converter(detailed_validation=False)
# cattrs generates its hooks on first use: do it here, once, so that a VM
# process forked from the warm zygote does not pay for it on every load.
for _cls in (X86VmState, X86VcpuState):
    _CONVERTER.get_structure_hook(_cls)
    _CONVERTER.get_unstructure_hook(_cls)


class RequestError(Exception):
    """A request failed; ``kind`` is the protocol's error type."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def map_memory(regions: Sequence[MemoryRegion], fds: Sequence[int], shared: bool) -> GuestMemory:
    """Map the guest memory the daemon passed: memfds (shared) or one file (private)."""
    built: list[GuestRegion] = []
    try:
        for index, region in enumerate(regions):
            if shared:
                mapping = mmap.mmap(fds[index], region.size, flags=mmap.MAP_SHARED, prot=_PROT_RW)
            else:
                mapping = mmap.mmap(
                    fds[0], region.size, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                    prot=_PROT_RW, offset=region.file_offset,
                )  # fmt: skip
            built.append(
                GuestRegion(
                    guest_addr=region.guest_addr,
                    size=region.size,
                    file_offset=region.file_offset,
                    host_addr=_mapping_address(mapping),
                    view=memoryview(mapping),
                    fd=fds[index] if shared else None,
                    mapping=mapping,
                )
            )
    except BaseException:
        for done in built:
            done.close()
        raise
    if not shared:
        for fd in fds:
            os.close(fd)
    return GuestMemory(tuple(built))


class VmServer:
    """Serves one VM over the VMM protocol (see the module doc)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.vm_id = ""
        self.memory: GuestMemory | None = None
        self.shared = True
        self.kvm: Kvm | None = None
        self.kvm_vm: KvmVm | None = None
        self.vcpus: list[Vcpu] = []
        self.runners: list[VcpuRunner] = []
        self.log_enabled = False
        self.listen_path: str | None = None
        self.test_hooks = False
        self._prepared: tuple[Kvm, KvmVm] | None = None
        self.page_server: UffdBackend | None = None
        self.file_fd: int | None = None
        #: What the daemon asked to keep across its restart (``note``).
        self.notes: dict[str, Any] = {}
        self.init_params: dict[str, Any] = {}
        self.error: str | None = None
        self._lock = threading.Lock()
        self._heartbeats = 0
        self._heartbeat_waiters: list[tuple[int, int]] = []
        #: Answers the ``exiter`` guest's work requests (vCPU threads).
        self._work = WorkDevice()
        self._generation = 0
        self._acked: set[int] = set()
        self._pause_id: int | None = None
        self._pause_harvest = False
        #: ``capture`` requests waiting for the pause under way.
        self._deferred_captures: list[int] = []
        #: Held while the collector captures, and by ``resume`` (never under ``_lock``).
        self._capture_lock = threading.Lock()
        self._collector: queue.SimpleQueue[Callable[[], None]] | None = None
        self._paused = False
        self._started = False

    # --- setup ---------------------------------------------------------------------------

    def init(self, message: Message, fds: list[int]) -> Message:
        """Map memory, build the KVM VM, restore state or write the guest program."""
        self.vm_id = str(message["vm_id"])
        skip = ("vm_state", "vcpu_states")
        self.init_params = {k: v for k, v in message.items() if k not in skip}
        regions = [MemoryRegion(*r) for r in message["regions"]]
        self.shared = message["memory"] == "shared"
        if message["memory"] == "uffd":
            for fd in fds:
                os.close(fd)
            self.memory = GuestMemory.anonymous(regions)
            try:
                self.page_server = UffdBackend.connect(
                    str(message["page_server"]), self.memory,
                    expected_pair_id=message.get("pair_id"),
                )  # fmt: skip
            except BaseException:
                self.memory.close()
                raise
        else:
            if not self.shared:  # kept for a re-attaching daemon's shadow
                self.file_fd = os.dup(fds[0])
            self.memory = map_memory(regions, fds, self.shared)
        vcpu_count = int(message["vcpu_count"])
        track = bool(message["track_dirty_pages"])
        # A private mapping (File restore) always logs: the daemon copies the
        # pages the guest diverged from the file (``vm/remote.py``).
        self.log_enabled = track or not self.shared
        # Revision 2: the daemon's dirty set, mirrored (module doc).
        self.ledger = DirtySet(tuple(r.size for r in regions), tracking=True) if track else None
        self.kvm, self.kvm_vm, self.vcpus = self._open_kvm(vcpu_count)
        guest = message.get("guest")
        if message.get("vm_state") is not None:
            self.kvm_vm.restore_vm_state(_CONVERTER.structure(message["vm_state"], X86VmState))
            for vcpu, plain in zip(self.vcpus, message["vcpu_states"], strict=True):
                vcpu.restore(_CONVERTER.structure(plain, X86VcpuState))
            self._paused = True
        elif guest is not None:
            try:
                image = kvm_guest.build_guest(
                    self.memory, guest["program"], dict(guest["params"]), vcpu_count
                )
            except (ValueError, KeyError) as error:
                raise RequestError(
                    "InvalidVmConfig", f"guest {guest['program']!r}: {error}"
                ) from error
            for vcpu in self.vcpus:
                image.setup_vcpu(vcpu)
        self.runners = [
            VcpuRunner(
                vcpu,
                io_handler=self._io,
                on_paused=self._on_paused,
                on_exit_error=self._on_exit_error,
            )
            for vcpu in self.vcpus
        ]
        self.listen_path = message.get("listen")
        return {
            "pid": os.getpid(),
            "host_addrs": [region.host_addr for region in self.memory.regions],
            "revision": REVISION,
        }

    def prepare(self) -> None:
        """Open KVM and create the VM with its in-kernel devices before ``init`` arrives.

        A spare VM process does this while it waits (``host.ZygoteHost``), so
        that a load does not pay for it.
        """
        self._prepared = open_vm()

    def _open_kvm(self, vcpu_count: int) -> tuple[Kvm, KvmVm, list[Vcpu]]:
        assert self.memory is not None
        prepared, self._prepared = self._prepared, None
        return _open_kvm(self.vm_id, vcpu_count, self.memory, self.log_enabled, prepared)

    # --- vCPU callbacks (vCPU threads) ------------------------------------------------

    def _io(self, port: int, size: int, is_write: bool, data: bytes) -> bytes | None:
        if port == kvm_guest.WORK_PORT and is_write:
            self._work.handle(data)
        elif port == kvm_guest.HEARTBEAT_PORT:
            with self._lock:
                self._heartbeats += 1
                ready = [w for w in self._heartbeat_waiters if w[1] <= self._heartbeats]
                if ready:
                    self._heartbeat_waiters = [
                        w for w in self._heartbeat_waiters if w[1] > self._heartbeats
                    ]
            for request_id, _target in ready:
                self._send(ok_reply(request_id, {"count": self._heartbeats}))
        return None

    def _on_paused(self, index: int) -> None:
        # Runs on the vCPU thread, under its runner's lock (``runner.py``): quick work only.
        with self._lock:
            if self._pause_id is None:
                return
            self._acked.add(index)
            if len(self._acked) < len(self.runners):
                return
            request_id, self._pause_id = self._pause_id, None
            captures, self._deferred_captures = self._deferred_captures, []
            harvest, generation = self._pause_harvest, self._generation
            self._paused = True
        result: Message = {}
        if harvest and self.log_enabled:
            try:
                result["dirty"] = [pack_dirty_words(w) for w in self._harvest_arrays()]
            except Exception:  # the daemon harvests with its own request then, and sees why
                _log.exception("VM %s: harvest at pause failed", self.vm_id)
        self._send(ok_reply(request_id, result))
        if captures:
            self._in_collector(lambda: self._capture_deferred(captures, generation))

    def _in_collector(self, job: Callable[[], None]) -> None:
        """Run ``job`` in the collector thread (started on first use)."""
        if self._collector is None:
            jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

            def serve() -> None:
                while True:
                    jobs.get()()

            threading.Thread(target=serve, name="vmm-collector", daemon=True).start()
            self._collector = jobs
        self._collector.put(job)

    def _capture_deferred(self, request_ids: list[int], generation: int) -> None:
        with self._capture_lock:
            with self._lock:
                current = self._generation == generation
            if not current:  # a resume came first (it answered nothing of these)
                replies = [
                    error_reply(i, "PauseAbandoned", "a resume arrived first") for i in request_ids
                ]
            else:
                try:
                    state = self._capture()
                    replies = [ok_reply(i, state) for i in request_ids]
                except Exception as error:
                    _log.exception("VM %s: capture failed", self.vm_id)
                    kind, text = type(error).__name__, str(error)
                    replies = [error_reply(i, kind, text) for i in request_ids]
        for reply in replies:
            self._send(reply)

    def _on_exit_error(self, index: int, message: str) -> None:
        text = f"vCPU {index} stopped: {message}"
        with self._lock:
            if self.error is None:
                self.error = text
        for runner in self.runners:
            runner.request_pause()
        self._send({"event": "vcpu_error", "index": index, "message": message})

    def _send(self, message: Message, fds: Sequence[int] = ()) -> None:
        # A daemon that went away misses this message; a new one re-reads the state.
        with contextlib.suppress(ChannelClosed):
            self.channel.send(message, fds)

    # --- requests (main thread) -----------------------------------------------------------

    def handle(self, message: Message, fds: list[int]) -> Message | None:
        """Answer one request (None: answered later by another thread)."""
        op = message.get("op")
        request_id = int(message["id"])
        handler = getattr(self, f"op_{op}", None)
        for fd in fds:
            os.close(fd)
        if handler is None:
            return error_reply(request_id, "UnknownOp", f"unknown op {op!r}")
        try:
            result = handler(request_id, message)
        except RequestError as error:
            return error_reply(request_id, error.kind, str(error))
        except Exception as error:  # reported to the daemon, not fatal to the guest
            _log.exception("VM %s: %s failed", self.vm_id, op)
            return error_reply(request_id, type(error).__name__, str(error))
        if result is None:
            return None
        return ok_reply(request_id, result)

    def op_start(self, request_id: int, message: Message) -> Message:
        self._start_threads()
        return {}

    def _start_threads(self) -> None:
        if not self._started:
            self._started = True
            self._paused = False
            for runner in self.runners:
                runner.start()
            if self.page_server is not None:
                self.page_server.start_monitor(self._page_server_died)

    def _page_server_died(self, reason: str) -> None:
        text = f"page server died: {reason}"
        with self._lock:
            if self.error is None:
                self.error = text
        for runner in self.runners:
            runner.request_pause()
        self._send({"event": "failed", "message": text})

    def op_pause(self, request_id: int, message: Message) -> Message | None:
        with self._lock:
            self._generation += 1
            self._acked = set()
            self._pause_id = request_id
            self._pause_harvest = bool(message.get("harvest", False))
        for runner in self.runners:
            runner.request_pause()
        return None

    def op_resume(self, request_id: int, message: Message) -> Message:
        with self._capture_lock, self._lock:  # a capture in progress ends first
            self._generation += 1
            abandoned, self._pause_id = self._pause_id, None
            captures, self._deferred_captures = self._deferred_captures, []
            self._acked = set()
            error = self.error
        if abandoned is not None:
            captures.insert(0, abandoned)
        for overtaken in captures:
            self._send(error_reply(overtaken, "PauseAbandoned", "a resume arrived first"))
        if error is not None:
            return {"running": False}
        if not self._started:
            self._start_threads()
            return {"running": True}
        for runner in self.runners:
            runner.resume()
        self._paused = False
        return {"running": True}

    def op_capture(self, request_id: int, message: Message) -> Message | None:
        with self._lock:
            if self._pause_id is not None:  # answered once every vCPU is parked
                self._deferred_captures.append(request_id)
                return None
        return self._capture()

    def _capture(self) -> Message:
        assert self.kvm_vm is not None
        return {
            "vm_state": _CONVERTER.unstructure(self.kvm_vm.capture_vm_state(), X86VmState),
            "vcpu_states": [
                _CONVERTER.unstructure(vcpu.capture(), X86VcpuState) for vcpu in self.vcpus
            ],
        }

    def op_set_dirty_logging(self, request_id: int, message: Message) -> Message:
        assert self.kvm_vm is not None and self.memory is not None
        enabled = bool(message["enabled"]) or not self.shared
        if enabled != self.log_enabled:
            for slot in range(len(self.memory.regions)):
                self.kvm_vm.set_dirty_logging(slot, enabled)
            self.log_enabled = enabled
        return {"enabled": self.log_enabled}

    def op_harvest(self, request_id: int, message: Message) -> Message:
        assert self.kvm_vm is not None and self.memory is not None
        if not self.log_enabled:
            raise RequestError("NotLogging", "dirty logging is off")
        arrays = self._harvest_arrays()
        if message.get("sparse"):
            return {"dirty": [pack_dirty_words(w) for w in arrays]}
        return {"words": [np.asarray(w, dtype="<u8").tobytes() for w in arrays]}

    def _harvest_arrays(self) -> list[np.ndarray[Any, np.dtype[np.uint64]]]:
        """Fetch and reset the KVM dirty log: every harvest goes through here (the ledger)."""
        assert self.kvm_vm is not None and self.memory is not None
        arrays = [
            self.kvm_vm.harvest_dirty_log(slot) for slot in range(len(self.memory.regions))
        ]
        if self.ledger is not None:
            for slot, words in enumerate(arrays):
                self.ledger.merge_kvm(slot, words)
        return arrays

    def op_dirty_mark(self, request_id: int, message: Message) -> Message:
        # Revision 2: the daemon wrote guest memory itself (KVM does not log that).
        if self.ledger is not None:
            self.ledger.mark(int(message["region"]), int(message["offset"]),
                             int(message["length"]))  # fmt: skip
        return {}

    def op_dirty_clear(self, request_id: int, message: Message) -> Message:
        # Revision 2: a snapshot holding these pages was committed.
        if self.ledger is not None:
            try:
                saved = [unpack_dirty_words(item) for item in message["dirty"]]
            except ProtocolError as error:
                raise RequestError("Protocol", str(error)) from error
            self.ledger.clear(saved)
        return {}

    def op_arm_stall(self, request_id: int, message: Message) -> Message:
        self.runners[int(message["index"])].arm_stall(kick=True)
        return {}

    def op_release_stall(self, request_id: int, message: Message) -> Message:
        self.runners[int(message["index"])].release_stall()
        return {}

    def op_wait_stalled(self, request_id: int, message: Message) -> None:
        runner = self.runners[int(message["index"])]
        timeout = float(message["timeout_s"])

        def wait() -> None:
            self._send(ok_reply(request_id, {"stalled": runner.wait_stalled(timeout)}))

        threading.Thread(target=wait, name="wait-stalled", daemon=True).start()
        return None

    def op_wait_heartbeats(self, request_id: int, message: Message) -> Message | None:
        with self._lock:
            target = self._heartbeats + int(message["count"])
            self._heartbeat_waiters.append((request_id, target))
        return None

    def op_note(self, request_id: int, message: Message) -> Message:
        self.notes.update(message["notes"])
        return {}

    def op_debug_syscall(self, request_id: int, message: Message) -> Message:
        # Test hook (init's confine.test_hooks): make a syscall the filter forbids.
        if not self.test_hooks:
            raise RequestError("UnknownOp", "debug_syscall is a test hook, not enabled")
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        return {}

    def op_describe(self, request_id: int, message: Message) -> Message:
        return self._description()

    def op_attach(self, request_id: int, message: Message) -> None:
        # The reply carries the memfds: a new daemon maps the same memory.
        assert self.memory is not None
        if self.shared:
            fds = [r.fd for r in self.memory.regions if r.fd is not None]
        else:
            fds = [self.file_fd] if self.file_fd is not None else []
        result = self._description()
        if self.ledger is not None:  # revision 2: where the new daemon's dirty set starts
            result["dirty"] = [pack_dirty_words(words) for words in self.ledger.words() or []]
        self._send(ok_reply(request_id, result), fds)
        return None

    def _description(self) -> Message:
        assert self.memory is not None
        return {
            "pid": os.getpid(),
            "vm_id": self.vm_id,
            "init": self.init_params,
            "notes": self.notes,
            "error": self.error,
            "started": self._started,
            "paused": self._paused,
            "log_enabled": self.log_enabled,
            "heartbeats": self._heartbeats,
            "host_addrs": [region.host_addr for region in self.memory.regions],
            "uid": os.getuid(),
            "revision": REVISION,
        }

    def op_release_lazy(self, request_id: int, message: Message) -> Message:
        # Teardown of a Uffd-loaded VM: unregister its memory from the
        # userfaultfd so that every access still waiting for a page (here, or
        # the daemon's process_vm_readv) returns (zeros) and nothing keeps
        # this process's memory from going away.
        if self.page_server is not None and self.memory is not None:
            release_lazy_pages(self.page_server.uffd.fd, self.memory)
        return {}

    def op_shutdown(self, request_id: int, message: Message) -> Message:
        raise SystemExit(0)

    def _listen(self) -> socket.socket | None:
        assert self.listen_path is not None
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.listen_path)
            listener.bind(self.listen_path)
            listener.listen(4)
        except OSError:
            _log.exception("VM %s cannot listen on %s", self.vm_id, self.listen_path)
            listener.close()
            return None
        return listener

    def _serve_connection(self) -> None:
        while True:
            message, fds = self.channel.receive()
            reply = self.handle(message, fds)
            if reply is not None:
                self.channel.send(reply)

    def bind_listener(self) -> None:
        """Create the re-attach socket now (before privileges are dropped)."""
        if self.listen_path is not None:
            self._listener = self._listen()
            _log_to(vm_log_path(self.listen_path))


def _log_to(path: str) -> None:
    """Send this process's stderr to ``path`` (appended, 0600): it outlives the daemon's."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        _log.exception("cannot open the VM process log %s", path)
        return
    os.dup2(fd, 2)
    os.close(fd)


def prioritise_control_thread() -> bool:
    """Run the calling thread at :data:`CONTROL_NICE`, the threads it starts at nice 0.

    Returns False (and changes nothing) without the privilege (``CAP_SYS_NICE``).
    """
    try:
        # Linux keeps scheduling attributes per thread: both calls affect this one only.
        os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, CONTROL_NICE)
    except OSError as error:
        _log.debug("VM process control thread keeps the default priority: %s", error)
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        return False
    return True


def serve_fd(fd: int, confine: bool = True) -> int:
    """Run a VM process on the connected socket ``fd``; returns the exit code."""
    install_signal_handler()
    prioritise_control_thread()
    channel = Channel(socket.socket(fileno=fd))
    server = VmServer(channel)
    with contextlib.suppress(Exception):  # init opens KVM itself then (and reports why not)
        server.prepare()
    try:
        message, fds = channel.receive()
    except ChannelClosed:
        return 1
    if message.get("op") != "init":
        channel.send(error_reply(int(message.get("id", 0)), "Protocol", "expected init"))
        return 1
    request_id = int(message["id"])
    try:
        result = server.init(message, fds)
    except RequestError as error:
        channel.send(error_reply(request_id, error.kind, str(error)))
        return 1
    except InvalidVmConfig as error:
        channel.send(error_reply(request_id, "InvalidVmConfig", error.reason))
        return 1
    except Exception as error:
        _log.exception("VM init failed")
        channel.send(error_reply(request_id, type(error).__name__, str(error)))
        return 1
    server.bind_listener()
    listener = getattr(server, "_listener", None)
    if confine and message.get("confine") is not None:
        from .confine import apply_confinement

        server.test_hooks = bool(message["confine"].get("test_hooks"))
        try:
            result["confinement"] = apply_confinement(message["confine"])
        except Exception as error:
            channel.send(error_reply(request_id, "Confinement", str(error)))
            return 1
    channel.send(ok_reply(request_id, result))
    try:
        if listener is not None:
            _serve_with_listener(server, listener)
        else:
            with contextlib.suppress(ChannelClosed):
                server._serve_connection()
    except SystemExit:
        pass
    return 0


def _serve_with_listener(server: VmServer, listener: socket.socket) -> None:
    while True:
        with contextlib.suppress(ChannelClosed):
            server._serve_connection()
        conn, _ = listener.accept()
        server.channel.close()
        server.channel = Channel(conn)


def main(argv: list[str]) -> int:
    """``squibd --vm-process --fd N``: serve one VM on inherited socket fd ``N``."""
    fd = int(argv[argv.index("--fd") + 1])
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    return serve_fd(fd)
