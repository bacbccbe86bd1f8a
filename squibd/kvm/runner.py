"""vCPU threads: one OS thread per vCPU running ``KVM_RUN``, paused on request.

Theory of operation
-------------------
A :class:`VcpuRunner` owns one thread that loops: park while a pause (or an
error) is pending, else ``KVM_RUN``, then handle the exit. To pause,
:meth:`VcpuRunner.request_pause` sets ``kvm_run.immediate_exit`` and sends
``SIGUSR1`` to the thread (a no-op Python handler is installed from the main
thread; ``SIG_IGN`` would drop the signal before it interrupts the ioctl).
``KVM_RUN`` then fails with ``EINTR`` (or returns at once if the thread was
about to enter it), the thread parks, and calls ``on_paused(index)`` once
per request, from the vCPU thread. :meth:`VcpuRunner.resume` clears the
request and the byte; a request the thread has not acted on yet is simply
dropped. The thread stays parked (it does not exit) until resumed or
stopped, so its vCPU state can be captured from any thread.

``on_paused`` runs with the runner's lock held, between parking and
waiting: while it runs, the request it answers is still in force, and a
:meth:`~VcpuRunner.resume` or :meth:`~VcpuRunner.request_pause` from
another thread waits for it to return. So whatever the callback reads
(e.g. the generation of the caller's pause request) belongs to a request
the vCPU really honours; an ack cannot be attributed to a newer request
that the thread then runs through. The callback must therefore be quick
and must not wait for a thread that controls this runner (it may call this
runner's own methods: the lock is re-entrant).

Exits: port I/O goes to the stall hook (:data:`~squibd.kvm.guest.STALL_PORT`),
the heartbeat counter, then ``io_handler``; a pause that arrives right after
an I/O exit first re-enters ``KVM_RUN`` once (``immediate_exit`` is set) so
that KVM completes the instruction before the vCPU parks and is captured.
A full dirty ring is collected into the VM's ring collector and the vCPU
re-enters. ``HLT``, ``SHUTDOWN``,
``FAIL_ENTRY``, ``INTERNAL_ERROR``, ``MMIO`` (no devices) and unknown exits
put the runner in an error state: ``on_exit_error(index,
message)`` with a message naming the exit, and the thread parks for good
(it still acknowledges pause requests).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import threading
from collections.abc import Callable
from typing import Final

import attrs

from . import _abi
from .errors import KvmError
from .guest import HEARTBEAT_PORT, STALL_PORT
from .vcpu import Vcpu

__all__ = ["PAUSE_SIGNAL", "IoHandler", "VcpuRunner", "install_signal_handler"]

_log = logging.getLogger(__name__)

#: The signal that kicks a vCPU thread out of ``KVM_RUN``.
PAUSE_SIGNAL: Final = signal.SIGUSR1
#: Value read by an ``IN`` nobody answers (an idle ISA bus reads all ones).
_FLOATING_BUS: Final = 0xFF

#: ``io_handler(port, size, is_write, data) -> bytes | None``: for an IN,
#: return ``size * count`` bytes (None = all ones); for an OUT the result is ignored.
IoHandler = Callable[[int, int, bool, bytes], "bytes | None"]


def _kick_handler(signum: int, frame: object) -> None:
    """No-op: the signal only exists to interrupt ``KVM_RUN``."""


def install_signal_handler() -> None:
    """Install the no-op ``SIGUSR1`` handler; call once from the main thread.

    Idempotent. A Python handler someone else installed also works and is kept.

    Raises:
        KvmError: called from another thread while no Python handler is set.
    """
    current = signal.getsignal(PAUSE_SIGNAL)
    if callable(current):
        return
    if threading.current_thread() is not threading.main_thread():
        raise KvmError(
            "the SIGUSR1 handler that pauses vCPUs is not installed; call "
            "squibd.kvm.install_signal_handler() from the main thread before starting vCPUs"
        )
    signal.signal(PAUSE_SIGNAL, _kick_handler)


@attrs.define(eq=False)
class VcpuRunner:
    """Runs one :class:`~squibd.kvm.vcpu.Vcpu` in its own thread; see the module doc."""

    vcpu: Vcpu
    io_handler: IoHandler | None = attrs.field(default=None, kw_only=True)
    on_paused: Callable[[int], None] | None = attrs.field(default=None, kw_only=True)
    on_exit_error: Callable[[int, str], None] | None = attrs.field(default=None, kw_only=True)
    #: Heartbeat OUTs seen (written by the vCPU thread only).
    heartbeats: int = attrs.field(default=0, init=False)
    #: Exits to userspace handled (written by the vCPU thread only).
    exits: int = attrs.field(default=0, init=False)
    #: Dirty-ring-full exits handled by collecting the ring.
    ring_full_exits: int = attrs.field(default=0, init=False)
    _cond: threading.Condition = attrs.field(factory=threading.Condition, init=False)
    _thread: threading.Thread | None = attrs.field(default=None, init=False)
    _pause_requested: bool = attrs.field(default=False, init=False)
    _pause_acked: bool = attrs.field(default=False, init=False)
    _parked: bool = attrs.field(default=False, init=False)
    _stop_requested: bool = attrs.field(default=False, init=False)
    _error: str | None = attrs.field(default=None, init=False)
    _stall_armed: bool = attrs.field(default=False, init=False)
    _stall_kick: bool = attrs.field(default=False, init=False)
    _stalled: threading.Event = attrs.field(factory=threading.Event, init=False)
    #: The last exit was port I/O that KVM completes only at the next KVM_RUN
    #: (vCPU thread only).
    _io_pending: bool = attrs.field(default=False, init=False)

    @property
    def index(self) -> int:
        """The vCPU index."""
        return self.vcpu.index

    @property
    def started(self) -> bool:
        """Whether :meth:`start` was called."""
        return self._thread is not None

    @property
    def alive(self) -> bool:
        """Whether the thread was started and has not exited yet."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def error(self) -> str | None:
        """The message of the exit that stopped this vCPU, if any."""
        return self._error

    @property
    def parked(self) -> bool:
        """Whether the thread is out of ``KVM_RUN`` and parked (paused or in error)."""
        with self._cond:
            return self._parked

    # --- control (any thread) -----------------------------------------------------------
    def start(self) -> None:
        """Start the vCPU thread (running unless a pause is already requested)."""
        install_signal_handler()
        with self._cond:
            if self._thread is not None:
                raise KvmError(f"vCPU {self.index} runner was already started")
            self._thread = threading.Thread(
                target=self._loop, name=f"vcpu-{self.index}", daemon=True
            )
            self._thread.start()

    def request_pause(self) -> None:
        """Ask the vCPU to leave ``KVM_RUN`` and park; ``on_paused`` fires once parked.

        A runner that was never started acknowledges at once (from this thread).
        Asking again while already paused acknowledges again (each request
        gets one ``on_paused``). ``on_paused`` runs under this runner's lock
        (see the module doc), so this call may wait for one in progress.
        """
        with self._cond:
            thread = self._thread
            self._pause_requested = True
            # An unstarted runner acks here; a parked thread re-acks when woken.
            self._pause_acked = thread is None
            self.vcpu.run.immediate_exit = 1
            self._cond.notify_all()
            if thread is None:
                self._notify_paused()  # under the lock, like the vCPU thread's acks
        if thread is not None:
            self._kick(thread)

    def resume(self) -> None:
        """Run again; also drops a pause request the thread has not acted on yet."""
        with self._cond:
            self._pause_requested = False
            self._pause_acked = False
            if not self._stop_requested and not self._stall_kick:
                self.vcpu.run.immediate_exit = 0
            self._cond.notify_all()

    def stop(self) -> None:
        """Make the thread exit (releases a stall); then call :meth:`join`."""
        with self._cond:
            self._stop_requested = True
            self._stall_armed = False
            self.vcpu.run.immediate_exit = 1
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            self._kick(thread)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to exit (after :meth:`stop`)."""
        if self._thread is not None:
            self._thread.join(timeout)

    # --- stall hook ------------------------------------------------------------------
    def arm_stall(self, *, kick: bool = True) -> None:
        """Hold the vCPU in userspace at its next exit until :meth:`release_stall`.

        With ``kick`` the vCPU is kicked out of ``KVM_RUN`` now (no guest
        help needed); without it, the guest's next write to
        :data:`STALL_PORT` blocks. A stalled vCPU does not acknowledge pause
        requests: tests use it to provoke a quiesce timeout.
        """
        with self._cond:
            self._stall_armed = True
            self._stalled.clear()
            self._cond.notify_all()
            if kick:
                self._stall_kick = True
                self.vcpu.run.immediate_exit = 1
            thread = self._thread
        if kick and thread is not None:
            self._kick(thread)

    def release_stall(self) -> None:
        """Let a stalled vCPU continue (and disarm the hook)."""
        with self._cond:
            self._stall_armed = False
            self._stall_kick = False
            if not self._pause_requested and not self._stop_requested:
                self.vcpu.run.immediate_exit = 0
            self._cond.notify_all()

    def wait_stalled(self, timeout: float | None = None) -> bool:
        """Block until the vCPU is held by the stall hook; False on timeout."""
        return self._stalled.wait(timeout)

    # --- vCPU thread -------------------------------------------------------------------
    def _kick(self, thread: threading.Thread) -> None:
        ident = thread.ident
        if ident is not None and thread.is_alive():
            with contextlib.suppress(ProcessLookupError):  # the thread exited meanwhile
                signal.pthread_kill(ident, PAUSE_SIGNAL)

    def _notify_paused(self) -> None:
        if self.on_paused is not None:
            try:
                self.on_paused(self.index)
            except Exception:  # a callback bug must not kill the vCPU thread
                _log.exception("on_paused callback of vCPU %d failed", self.index)

    def _wait_until_runnable(self) -> bool:
        """Park while paused or in error; ack pauses. False when the thread must exit."""
        with self._cond:
            while True:
                if self._stop_requested:
                    self._parked = True
                    return False
                if self._pause_requested and not self._pause_acked:
                    if self._io_pending and self._error is None:
                        # KVM finishes an I/O exit (IN data into RAX, RIP past
                        # the instruction) only at the next KVM_RUN; parked now,
                        # the captured state would replay the I/O on restore.
                        # immediate_exit is set while a pause is pending, so
                        # that run completes the I/O, runs no guest
                        # instruction and fails with EINTR (KVM api.rst, "kvm_run").
                        self._parked = False
                        return True
                    self._pause_acked = True
                    self._parked = True
                    # Still under the lock (see the module doc): releasing it
                    # before the callback let a resume() and a newer request
                    # slip in, and the callback then reported this ack as an
                    # answer to the newer request while the thread ran on.
                    self._notify_paused()
                    continue  # the callback may have resumed or re-requested
                if self._pause_requested or self._error is not None:
                    self._parked = True
                    self._cond.wait()
                    continue
                if self._stall_kick:
                    self._stall_kick = False
                    if self._stall_armed:
                        self._stall_locked()
                        continue
                self._parked = False
                return True

    def _stall_locked(self) -> None:
        """Hold here (lock held, waiting releases it) while the stall is armed."""
        while self._stall_armed and not self._stop_requested:
            self._stalled.set()  # again after a release and re-arm that raced the wake-up
            self._cond.wait()
        self._stalled.clear()
        if not self._pause_requested and not self._stop_requested:
            self.vcpu.run.immediate_exit = 0

    def _loop(self) -> None:
        fd = self.vcpu.fd
        while self._wait_until_runnable():
            result, err = _abi.ioctl_raw(fd, _abi.KVM_RUN)
            self._io_pending = False  # any KVM_RUN completes it first
            if result < 0:
                if err in (errno.EINTR, errno.EAGAIN):
                    continue
                self._fail(f"KVM_RUN failed: {errno.errorcode.get(err, err)} (os error {err})")
                continue
            self.exits += 1
            try:
                message = self._handle_exit()
            except Exception as exc:  # e.g. the io_handler raised
                message = f"handling exit reason {int(self.vcpu.run.exit_reason)} failed: {exc!r}"
            if message is not None:
                self._fail(message)

    def _fail(self, message: str) -> None:
        with self._cond:
            if self._error is not None:
                return
            self._error = message
        if self.on_exit_error is not None:
            try:
                self.on_exit_error(self.index, message)
            except Exception:
                _log.exception("on_exit_error callback of vCPU %d failed", self.index)

    def _handle_exit(self) -> str | None:
        """Handle one exit; return an error message when the vCPU cannot go on."""
        run = self.vcpu.run
        reason = int(run.exit_reason)
        name = _abi.EXIT_REASONS.get(reason, f"exit reason {reason}")
        if reason == _abi.KVM_EXIT_IO:
            self._handle_io()
            self._io_pending = True
            return None
        if reason == _abi.KVM_EXIT_INTR:
            return None
        if reason == _abi.KVM_EXIT_SHUTDOWN:
            return f"{name}: the guest shut down (a triple fault)"
        if reason == _abi.KVM_EXIT_HLT:
            return f"{name}: the guest halted with no way to wake up"
        if reason == _abi.KVM_EXIT_FAIL_ENTRY:
            fail = run.exit.fail_entry
            return (
                f"{name}: the hardware refused to enter the guest "
                f"(reason {fail.hardware_entry_failure_reason:#x}, cpu {fail.cpu})"
            )
        if reason == _abi.KVM_EXIT_INTERNAL_ERROR:
            internal = run.exit.internal
            words = min(int(internal.ndata), _abi.KVM_INTERNAL_ERROR_DATA_WORDS)
            data = ", ".join(f"{int(w):#x}" for w in internal.data[:words])
            return (
                f"{name}: KVM could not emulate the guest "
                f"(suberror {internal.suberror}, data [{data}])"
            )
        if reason == _abi.KVM_EXIT_DIRTY_RING_FULL:
            ring = self.vcpu.dirty_ring
            if ring is None:
                return f"{name}: the dirty ring is full but this vCPU has no ring mapped"
            self.vcpu.vm.collect_dirty_ring(ring)  # then re-enter
            self.ring_full_exits += 1
            return None
        if reason == _abi.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            access = "write" if mmio.is_write else "read"
            return (
                f"{name}: the guest did a {mmio.len}-byte MMIO {access} at "
                f"{mmio.phys_addr:#x} but this VM has no MMIO devices"
            )
        return f"{name}: squibd does not handle this exit"

    def _handle_io(self) -> None:
        io = self.vcpu.run.exit.io
        port, size, count = int(io.port), int(io.size), int(io.count)
        is_write = int(io.direction) == _abi.KVM_EXIT_IO_OUT
        length = size * count
        address = self.vcpu.run_addr + int(io.data_offset)
        if is_write and port == STALL_PORT:
            with self._cond:
                if self._stall_armed:
                    self._stall_locked()
            return
        if is_write and port == HEARTBEAT_PORT:
            self.heartbeats += 1
        data = _abi.read_memory(address, length) if is_write else bytes(length)
        reply = self.io_handler(port, size, is_write, data) if self.io_handler else None
        if not is_write:
            filled = (reply or b"")[:length].ljust(length, bytes([_FLOATING_BUS]))
            _abi.write_memory(address, filled)
