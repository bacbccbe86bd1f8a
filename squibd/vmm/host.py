"""Daemon side of VM processes: the zygote client and the per-VM connection.

``ZygoteHost`` starts the zygote (once, in a worker thread) and asks it for
VM processes; it keeps the wait status of every VM process that ended, for
the error message of its VM. ``Connection`` is the daemon's end of one VM
process's socket: requests from any thread (blocking) or from trio
(awaitable, without a thread hop), replies matched by id, events and the end
of the stream handed to callbacks; one reader per VM: a trio system task,
or a thread where there is no trio run (the zygote's connection).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final

import trio

from .channel import Channel, ChannelClosed
from .protocol import Message, ProtocolError, request
from .untraced import Child, spawn_untraced

__all__ = ["Connection", "Reply", "RequestFailed", "ZygoteHost", "describe_status"]

_log = logging.getLogger(__name__)

#: How long the end of a VM process's stream waits for its wait status.
STATUS_WAIT_S: Final = 2.0


class RequestFailed(Exception):
    """The VM process answered a request with an error, or is gone."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


def describe_status(status: int) -> str:
    """A wait status in words: ``killed by SIGKILL`` or ``exited with status 3``."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by {name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"ended with wait status {status}"


class Reply:
    """The reply to one request, awaited on trio or waited for in a thread.

    ``convert``, if given, is applied to a successful result by whoever
    reads the reply, as it arrives (so that a waiter finds the work done);
    :attr:`converted` holds its value (None: not converted, e.g. it raised:
    the waiter converts then, and sees the error).
    """

    def __init__(self, on_trio: bool, convert: Callable[[Message], Any] | None = None) -> None:
        self.thread_event = threading.Event()
        self._token = trio.lowlevel.current_trio_token() if on_trio else None
        self.trio_event: trio.Event | None = trio.Event() if on_trio else None
        self.reply: Message | None = None
        self.error: RequestFailed | None = None
        self._convert = convert
        self.converted: Any = None

    def complete(self, reply: Message | None, error: RequestFailed | None, *,
                 on_trio_thread: bool = False) -> None:  # fmt: skip
        """Hand over the reply (or why none comes); ``on_trio_thread``: called by trio's reader."""
        self.reply, self.error = reply, error
        if self._convert is not None and reply is not None and reply.get("ok"):
            try:
                self.converted = self._convert(reply.get("result") or {})
            except Exception:  # the waiter converts again and gets the error
                self.converted = None
        self.thread_event.set()
        if self.trio_event is not None:
            if on_trio_thread:
                self.trio_event.set()
            else:
                assert self._token is not None
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(self.trio_event.set)

    @property
    def done(self) -> bool:
        """Whether the reply (or the failure) is in."""
        return self.thread_event.is_set()

    def wait(self) -> Message:
        """Block (worker thread) for the result.

        Raises:
            RequestFailed: the process answered an error or died.
        """
        self.thread_event.wait()
        return self.result()

    async def await_result(self) -> Message:
        """Await the result on trio (a reply requested with ``on_trio``)."""
        assert self.trio_event is not None
        await self.trio_event.wait()
        return self.result()

    def result(self) -> Message:
        """The result of a completed request.

        Raises:
            RequestFailed: the process answered an error or died.
        """
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        if not self.reply.get("ok"):
            err = self.reply.get("error") or {}
            raise RequestFailed(str(err.get("type", "Error")), str(err.get("message", "")))
        result: Message = self.reply.get("result") or {}
        return result


class Connection:
    """The daemon's end of one VM process (see the module doc).

    Its reader is either a trio system task (:meth:`start` with a token):
    trio waits for the socket itself, so that a reply reaches the trio task
    awaiting it without a thread hop; or a reader thread (no token: the
    zygote's control connection). Either hands events to ``on_event`` (on
    the reader's thread) and the end of the stream to ``on_closed`` (always
    in a thread other than trio's: it may block).
    """

    def __init__(
        self,
        channel: Channel,
        *,
        on_event: Callable[[Message], None],
        on_closed: Callable[[str], None],
    ) -> None:
        self.channel = channel
        self._on_event = on_event
        self._on_closed = on_closed
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, Reply] = {}
        self._closed_reason: str | None = None
        self.last_fds: list[int] = []
        self._ended = threading.Event()
        self._started = False
        self._token: trio.lowlevel.TrioToken | None = None
        #: The trio reader owns the socket's closing (trio must not wait on a closed fd).
        self._trio_reader = False

    def start(self, token: trio.lowlevel.TrioToken | None = None) -> None:
        """Start reading: a system task of ``token``'s trio run, else a reader thread."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._trio_reader = token is not None
            self._token = token
        if token is None:
            self._start_thread()
            return

        def spawn() -> None:
            try:
                trio.lowlevel.spawn_system_task(self._read_trio, name="vmm-reader")
            except RuntimeError:  # trio is shutting down: read in a thread instead
                self._fall_back_to_thread()

        try:
            token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            self._fall_back_to_thread()

    def _fall_back_to_thread(self) -> None:
        with self._lock:
            self._trio_reader = False
        self._start_thread()

    def _start_thread(self) -> None:
        threading.Thread(target=self._read_thread, name="vmm-reader", daemon=True).start()

    def begin(self, op: str, fds: Sequence[int] = (), *, on_trio: bool = False,
              convert: Callable[[Message], Any] | None = None, **params: Any) -> Reply:  # fmt: skip
        """Send a request now; its :class:`Reply` is awaited (``on_trio``) or waited for later.

        Requests are sent in call order, so a caller may pipeline several.
        ``convert``: see :class:`Reply`.
        """
        pending = Reply(on_trio, convert)
        with self._lock:
            request_id = next(self._ids)
            if self._closed_reason is not None:
                pending.complete(None, RequestFailed("ProcessGone", self._closed_reason))
                return pending
            self._pending[request_id] = pending
        try:
            self.channel.send(request(request_id, op, **params), fds)
        except ChannelClosed as error:
            with self._lock:
                self._pending.pop(request_id, None)
            pending.complete(None, RequestFailed("ProcessGone", str(error)))
        return pending

    def call(self, op: str, fds: Sequence[int] = (), **params: Any) -> Message:
        """Send a request and block for its result.

        Meant for worker threads. Called on the trio thread whose task reads
        this connection (tests do), it reads the socket itself meanwhile: that
        task cannot run while the thread blocks.

        Raises:
            RequestFailed: the process answered an error or died.
        """
        reply = self.begin(op, fds, **params)
        if not reply.done and self._on_reader_trio_thread():
            self._read_until(reply)
        return reply.wait()

    def _on_reader_trio_thread(self) -> bool:
        with self._lock:
            if not self._trio_reader or self._token is None:
                return False
        try:
            return trio.lowlevel.current_trio_token() is self._token
        except RuntimeError:
            return False

    def _read_until(self, reply: Reply) -> None:
        # The trio reader is suspended (same thread): the channel is ours until we return.
        try:
            while not reply.done:
                message, fds = self.channel.receive()
                self._dispatch(message, fds, on_trio_thread=True)
            # What came in the same reads is buffered now, and the socket no longer
            # readable: the trio reader, waiting for readability, would never see it.
            while (buffered := self.channel.take_buffered()) is not None:
                self._dispatch(*buffered, on_trio_thread=True)
        except ChannelClosed as error:  # the trio reader sees the end too, and reports it
            self._end(f"connection closed ({error})", on_trio_thread=True)
        except ProtocolError as error:
            self._end(f"protocol error: {error}", on_trio_thread=True)
            self.channel.shutdown()  # the trio reader then ends the connection

    def send(self, op: str, **params: Any) -> None:
        """Send a request without waiting (its reply is dropped)."""
        self.begin(op, **params)

    async def acall(self, op: str, **params: Any) -> Message:
        """Send a request and await its result on trio.

        On cancellation the request is abandoned (its reply is dropped).
        """
        return await self.begin(op, on_trio=True, **params).await_result()

    def _dispatch(self, message: Message, fds: list[int], on_trio_thread: bool) -> None:
        request_id = message.get("id")
        if request_id is None:
            for fd in fds:
                os.close(fd)
            try:
                self._on_event(message)
            except Exception:  # a handler bug must not end the reader (or trio's run)
                _log.exception("VM process event handler failed on %r", message.get("event"))
            return
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"reply id {request_id!r} is not an integer")
        with self._lock:
            pending = self._pending.pop(request_id, None)
        if pending is None:
            for fd in fds:
                os.close(fd)
            return
        self.last_fds = fds
        pending.complete(message, None, on_trio_thread=on_trio_thread)

    def _end(self, reason: str, *, on_trio_thread: bool) -> None:
        with self._lock:
            self._closed_reason = reason
            pending_all = list(self._pending.values())
            self._pending.clear()
        for pending in pending_all:
            pending.complete(
                None, RequestFailed("ProcessGone", reason), on_trio_thread=on_trio_thread
            )

    def _read_thread(self) -> None:
        reason = "connection closed"
        try:
            while True:
                message, fds = self.channel.receive()
                self._dispatch(message, fds, on_trio_thread=False)
        except ChannelClosed as error:
            reason = f"connection closed ({error})"
        except ProtocolError as error:
            reason = f"protocol error: {error}"
        except Exception as error:
            _log.exception("VM process connection reader failed")
            reason = f"reader failed: {error!r}"
        finally:
            self._end(reason, on_trio_thread=False)
            try:
                self._on_closed(reason)
            finally:
                self._ended.set()

    async def _read_trio(self) -> None:
        reason = "the daemon's event loop ended"
        notify = False
        try:
            while True:
                got = self.channel.poll()
                if got is None:
                    await trio.lowlevel.wait_readable(self.channel.sock)
                    continue
                self._dispatch(*got, on_trio_thread=True)
                await trio.lowlevel.checkpoint()
        except ChannelClosed as error:
            reason, notify = f"connection closed ({error})", True
        except ProtocolError as error:
            reason, notify = f"protocol error: {error}", True
        except Exception as error:  # never crash trio's run over one VM process
            _log.exception("VM process connection reader failed")
            reason, notify = f"reader failed: {error!r}", True
        finally:
            self._end(reason, on_trio_thread=True)
            with self._lock:
                self._trio_reader = False
            self.channel.close()
            if not notify:
                self._ended.set()
        # ``on_closed`` may block (it waits for the exit status): not on trio's thread.
        try:
            await trio.to_thread.run_sync(self._on_closed, reason)
        finally:
            self._ended.set()

    @property
    def closed(self) -> bool:
        """Whether the stream ended."""
        return self._closed_reason is not None

    def close(self) -> None:
        """End the connection (the reader then ends; any thread)."""
        with self._lock:
            trio_reads = self._trio_reader
        if trio_reads:
            self.channel.shutdown()  # the trio reader sees the end and closes the socket
        else:
            self.channel.close()

    def join(self, timeout_s: float) -> bool:
        """Wait for the reader to end (``on_closed`` included); True if it did."""
        if not self._started:
            return True
        return self._ended.wait(timeout_s)


class ZygoteHost:
    """The warm zygote of one daemon and the wait statuses it reports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Child | None = None
        self._conn: Connection | None = None
        self._statuses: dict[int, int] = {}
        self._status_cond = threading.Condition(self._lock)
        self._spare: tuple[int, Channel] | None = None

    def ensure_started(self) -> Connection:
        """Start the zygote unless running (blocking: worker threads)."""
        with self._lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # Out of reach of a tracer that follows the daemon (``untraced.py``).
                self._proc = spawn_untraced(
                    [sys.executable, "-m", "squibd.vmm.zygote", "--fd", str(theirs.fileno())],
                    theirs.fileno(),
                )
            finally:
                theirs.close()
            conn = Connection(Channel(ours), on_event=self._event, on_closed=lambda _r: None)
            conn.start()
            self._conn = conn
            return conn

    def _event(self, message: Message) -> None:
        if message.get("event") == "exited":
            with self._status_cond:
                self._statuses[int(message["pid"])] = int(message["status"])
                self._status_cond.notify_all()

    def spawn(self) -> tuple[int, Channel]:
        """A new VM process and the daemon's end of its socket (blocking).

        One spare VM process is kept forked ahead (it opens KVM while it
        waits for ``init``); it is handed out here and the next is forked in
        the background.

        Raises:
            RequestFailed: the zygote refused or is gone.
        """
        with self._lock:
            spare, self._spare = self._spare, None
        self._refill()
        if spare is not None:
            pid, channel = spare
            if self.wait_status(pid, 0) is None:
                return spare
            channel.close()
        return self._fork()

    def prefork(self) -> None:
        """Fork the spare VM process now (in the background)."""
        self._refill()

    def _refill(self) -> None:
        def work() -> None:
            with contextlib.suppress(Exception):
                spare = self._fork()
                with self._lock:
                    if self._spare is None and self._conn is not None:
                        self._spare = spare
                        return
                spare[1].close()  # not needed any more: it exits on EOF

        threading.Thread(target=work, name="vmm-spare", daemon=True).start()

    def _fork(self) -> tuple[int, Channel]:
        conn = self.ensure_started()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            result = conn.call("spawn", fds=[theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return int(result["pid"]), Channel(ours)

    def wait_status(self, pid: int, timeout_s: float = STATUS_WAIT_S) -> int | None:
        """The wait status of VM process ``pid`` once the zygote reaped it (None: not known)."""
        with self._status_cond:
            self._status_cond.wait_for(lambda: pid in self._statuses, timeout_s)
            return self._statuses.get(pid)

    @property
    def pid(self) -> int | None:
        """The zygote's pid, once started."""
        return self._proc.pid if self._proc is not None else None

    def close(self) -> None:
        """Stop the zygote (its VM processes carry on). Blocking."""
        with self._lock:
            conn, proc = self._conn, self._proc
            self._conn = self._proc = None
            spare, self._spare = self._spare, None
        if spare is not None:
            spare[1].close()
        if conn is not None:
            conn.close()
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
