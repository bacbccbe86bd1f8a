"""The VMM side of lazy restore: register guest memory, hand it to a page server.

``UffdBackend.connect(backend_path, memory)`` creates a userfaultfd,
registers every (empty, anonymous) guest memory region for missing faults,
connects to the page server and sends the Firecracker handshake, asking for
squibd's status lines (see ``handshake``). It raises a clear ``UffdError``
before any vCPU runs when the server is absent, refuses, closes the socket,
reports an error, or does not answer in time.

Which kind of server answers is known without waiting: once the server has
consumed the handshake (``SIOCOUTQ`` of our socket drops to 0), a squibd
page server's hello is already in our receive queue. Without a hello the
server is Firecracker-style (it never answers) and the load goes on at once;
with one, ``connect`` waits (bounded) for the ready or error line. Every wait
is bounded: connecting, sending, the server taking the handshake (a server
busy with another VM that never accepts us) and the ready line.

After the vCPUs start, ``start_monitor(on_dead)`` watches the socket from a
thread; when the page server's end closes, ``on_dead(reason)`` is called
(once, from that thread) so the runtime can stop the vCPUs and mark the VM
failed. The userfaultfd stays open meanwhile: a closed userfaultfd would let
the kernel zero-fill missing pages and the guest would run on memory that was
never restored. Close the backend only after the vCPUs are stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import attrs

from .errors import HandshakeFailed, PageServerUnavailable
from .handshake import MAX_SOCKET_PATH_BYTES, RegionMapping, send_handshake
from .userfaultfd import Userfaultfd

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "DEFAULT_READY_TIMEOUT_S",
    "GuestMemoryLike",
    "HostRegion",
    "UffdBackend",
]

#: How long ``connect`` waits, after a squibd page server said hello, for its
#: ``{"ready": true}`` (it checks the layout and prefetches a few pages first).
#: Firecracker-style servers say no hello and are never waited for.
DEFAULT_READY_TIMEOUT_S: Final = 30.0
#: How long ``connect`` waits for the server to accept the connection and take
#: the handshake (a single-VM server busy with another VM never does).
DEFAULT_HANDSHAKE_TIMEOUT_S: Final = 10.0
_STATUS_READ_BYTES: Final = 65536
#: Polling steps while waiting for the server to take the handshake: there is no
#: event for "the peer read our data", so SIOCOUTQ is sampled, starting fine
#: (a server that is there takes it within microseconds) and backing off.
_TAKE_POLL_FIRST_S: Final = 0.00005
_TAKE_POLL_MAX_S: Final = 0.005
_INT: Final = struct.Struct("i")


class HostRegion(Protocol):
    """A guest memory region as mapped in this process (``vm.memory.GuestRegion``)."""

    @property
    def host_addr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def file_offset(self) -> int: ...


class GuestMemoryLike(Protocol):
    """Guest memory mapped anonymous and empty (``GuestMemory.anonymous(regions)``)."""

    @property
    def regions(self) -> Sequence[HostRegion]: ...


def _connect(path: str, timeout: float) -> socket.socket:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise PageServerUnavailable(path, f"the path is longer than {MAX_SOCKET_PATH_BYTES} bytes")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BlockingIOError as exc:  # EAGAIN: a Unix listener's backlog is full
        sock.close()
        raise PageServerUnavailable(
            path, "its queue of connections is full (it is busy with other VMs)"
        ) from exc
    except TimeoutError as exc:
        sock.close()
        raise PageServerUnavailable(
            path, f"it did not accept the connection within {timeout:g} s"
        ) from exc
    except FileNotFoundError as exc:
        sock.close()
        raise PageServerUnavailable(path, "no socket exists at that path") from exc
    except ConnectionRefusedError as exc:
        sock.close()
        raise PageServerUnavailable(path, "it refused the connection") from exc
    except OSError as exc:
        sock.close()
        raise PageServerUnavailable(path, exc.strerror or str(exc)) from exc
    return sock


def _outq(sock: socket.socket) -> int:
    """Bytes we sent that the peer has not read yet (SIOCOUTQ, an alias of TIOCOUTQ)."""
    raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(_INT.size))
    value: int = _INT.unpack(raw)[0]
    return value


def _said_before_closing(sock: socket.socket) -> str | None:
    """The error line a server queued before it closed on us, if any."""
    try:
        data = sock.recv(_STATUS_READ_BYTES, socket.MSG_DONTWAIT)
    except OSError:
        return None
    return _parse_status(data)[1]


def _parse_status(data: bytes) -> tuple[bool, str | None, str | None]:
    """(ready seen, error message, pair id) from a squibd page server's status lines."""
    ready, error, pair_id = False, None, None
    for line in data.splitlines():
        try:
            message = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(message, dict):
            if message.get("ready") is True:
                ready = True
                if isinstance(message.get("pair_id"), str):
                    pair_id = message["pair_id"]
            if isinstance(message.get("error"), str):
                error = message["error"]
    return ready, error, pair_id


@attrs.define(eq=False)
class UffdBackend:
    """A live connection to a page server serving this process's guest memory."""

    path: str
    uffd: Userfaultfd
    sock: socket.socket
    regions: tuple[RegionMapping, ...]
    #: Why the page server stopped serving, once it has (None while it serves).
    dead_reason: str | None = None
    _monitor: threading.Thread | None = None
    _wake_r: int = -1
    _wake_w: int = -1
    _closed: bool = False

    @classmethod
    def connect(
        cls,
        backend_path: str,
        memory: GuestMemoryLike,
        *,
        ready_timeout: float = DEFAULT_READY_TIMEOUT_S,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT_S,
        expected_pair_id: str | None = None,
    ) -> UffdBackend:
        """Register ``memory`` with a new userfaultfd and hand it to the page server.

        Args:
            backend_path: the page server's Unix socket (at most 107 bytes).
            memory: empty anonymous guest memory (nothing may have touched it).
            ready_timeout: seconds to wait for a squibd page server's ready line
                once it said hello (Firecracker-style servers are not waited for).
            handshake_timeout: seconds for the server to accept the connection and
                take the handshake.
            expected_pair_id: the loaded state file's ``memory.pair_id``; a squibd page
                server announcing another pair is refused (Firecracker-style servers
                announce nothing and are trusted).

        Raises:
            UffdUnsupported: no userfaultfd on this host.
            PageServerUnavailable: no socket, the connection is refused, or the
                server's queue is full or it does not accept in time.
            HandshakeFailed: the server closed the socket, reported an error, or
                did not take the handshake or report ready in time.
        """
        page_size = os.sysconf("SC_PAGE_SIZE")
        regions = tuple(
            RegionMapping(r.host_addr, r.size, r.file_offset, page_size) for r in memory.regions
        )
        sock = _connect(backend_path, handshake_timeout)
        try:
            uffd = Userfaultfd.create()
        except BaseException:
            sock.close()
            raise
        try:
            for region in regions:
                uffd.register(region.base_host_virt_addr, region.size)
            try:
                send_handshake(sock, regions, uffd.fd, want_status=True)
            except TimeoutError as exc:
                raise HandshakeFailed(
                    backend_path, f"it took no handshake within {handshake_timeout:g} s"
                ) from exc
            except OSError as exc:
                said = _said_before_closing(sock)  # e.g. refused: it serves enough VMs
                raise HandshakeFailed(
                    backend_path,
                    f"the page server refused: {said}"
                    if said
                    else f"it closed the socket ({exc.strerror or exc})",
                ) from exc
            first = cls._await_taken(backend_path, sock, handshake_timeout)
            if first is not None:  # a squibd page server: it will say ready or why not
                cls._await_ready(backend_path, sock, first, ready_timeout, expected_pair_id)
            sock.settimeout(None)
        except BaseException:
            uffd.close()
            sock.close()
            raise
        wake_r, wake_w = os.pipe2(os.O_CLOEXEC)
        return cls(backend_path, uffd, sock, regions, wake_r=wake_r, wake_w=wake_w)

    @staticmethod
    def _await_taken(path: str, sock: socket.socket, timeout: float) -> bytes | None:
        """Wait until the server consumed the handshake; the squibd hello (and what
        followed it) if it said one, None for a Firecracker-style server."""
        deadline = time.monotonic() + timeout
        step = _TAKE_POLL_FIRST_S
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        while True:
            taken = _outq(sock) == 0
            # Checked after SIOCOUTQ: a squibd server queues its hello before it takes
            # the handshake, so "taken and nothing to read" means no hello will come.
            if poller.poll(0):
                return UffdBackend._read_status(path, sock)
            if taken:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise HandshakeFailed(
                    path,
                    f"it did not take the handshake within {timeout:g} s (a page server "
                    "that serves one VM at a time may be busy with another)",
                )
            select.select([sock], [], [], min(step, remaining))
            step = min(step * 2, _TAKE_POLL_MAX_S)

    @staticmethod
    def _read_status(path: str, sock: socket.socket) -> bytes:
        try:
            data = sock.recv(_STATUS_READ_BYTES, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return b"\n"  # readable a moment ago; nothing now: treat as no line yet
        except ConnectionResetError:
            data = b""  # it closed without reading everything we sent
        except OSError as exc:
            raise HandshakeFailed(path, f"the connection failed ({exc.strerror or exc})") from exc
        if not data:
            raise HandshakeFailed(path, "it closed the socket during the handshake")
        _ready, error, _pair = _parse_status(data)
        if error is not None:
            raise HandshakeFailed(path, f"the page server refused: {error}")
        return data

    @staticmethod
    def _await_ready(
        path: str,
        sock: socket.socket,
        received: bytes,
        timeout: float,
        expected_pair_id: str | None,
    ) -> None:
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        data = received
        while True:
            ready, error, pair_id = _parse_status(data)
            if error is not None:
                raise HandshakeFailed(path, f"the page server refused: {error}")
            if ready:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(max(1, int(remaining * 1000))):
                raise HandshakeFailed(
                    path, f"the squibd page server did not report ready within {timeout:g} s"
                )
            data += UffdBackend._read_status(path, sock)
        if expected_pair_id is not None and pair_id is not None and pair_id != expected_pair_id:
            raise HandshakeFailed(
                path,
                f"it serves the memory of snapshot pair {pair_id}, but the state file "
                f"belongs to pair {expected_pair_id}",
            )

    def start_monitor(self, on_dead: Callable[[str], None]) -> None:
        """Watch the page server from a daemon thread; ``on_dead(reason)`` fires once if it goes.

        ``on_dead`` runs in the monitor thread: hand the news to the runtime
        thread-safely (e.g. ``trio.from_thread.run_sync`` or a lock).
        """
        if self._monitor is not None:
            raise RuntimeError("the monitor is already running")
        self._monitor = threading.Thread(
            target=self._watch, args=(on_dead,), name=f"uffd-monitor:{self.path}", daemon=True
        )
        self._monitor.start()

    def _watch(self, on_dead: Callable[[str], None]) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        poller.register(self._wake_r, select.POLLIN)
        error: str | None = None
        while True:
            events = dict(poller.poll())
            if self._wake_r in events:
                return
            try:
                data = self.sock.recv(_STATUS_READ_BYTES)
            except ConnectionResetError:
                data = b""
            except OSError as exc:
                data, error = b"", error or f"connection error: {exc.strerror or exc}"
            if data:
                error = _parse_status(data)[1] or error
                continue
            break
        reason = f"the page server at {self.path!r} stopped serving guest memory: " + (
            error if error is not None else "it closed the connection (exited or was killed)"
        )
        self.dead_reason = reason
        on_dead(reason)

    def close(self) -> None:
        """Stop the monitor, close the socket and the userfaultfd (idempotent).

        Call only after the vCPUs stopped and nothing touches guest memory:
        once the userfaultfd is closed, missing pages read as zeros.
        """
        if self._closed:
            return
        self._closed = True
        if self._monitor is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
            if self._monitor is not threading.current_thread():
                self._monitor.join()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.uffd.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)

    def __enter__(self) -> UffdBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
