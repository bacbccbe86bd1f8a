"""Firecracker-style REST sockets: HTTP/1.1 (h11) on trio over Unix sockets.

Theory of operation
-------------------
Each socket serves one VM's Firecracker API (the routes are
:class:`squibd.api.firecracker.FirecrackerApp`'s business; this module only
speaks HTTP). :func:`serve_http` accepts connections; each connection runs
in its own task behind its own error boundary:

1. read ``SO_PEERCRED`` and check it against the same allow list as the
   JSON-RPC socket; a refused peer gets ``403`` with a ``fault_message``
   for its first request, and the connection closes;
2. loop: read one request with h11 (headers at most :data:`MAX_HEADER_BYTES`,
   body at most :data:`MAX_PAYLOAD_BYTES` as Firecracker's server allows),
   call the app, write the answer (JSON body, or none for ``204``), then
   start the next cycle (keep-alive) or close when either side asked to.

A connection that sends nothing for ``idle_timeout_s`` is closed; a peer
that does not read its answer for :data:`WRITE_TIMEOUT_S` is dropped. A
protocol error from the peer is answered ``400`` and the connection closes.

:class:`FirecrackerSockets` is the daemon's hook for ``vm.create``'s
``api_socket``: it binds a socket (mode 0600) per VM and runs
:func:`serve_http` for it in the server's connection nursery until the VM
is destroyed or the daemon stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from typing import Any, Final, Protocol

import attrs
import h11
import trio

from squibd.api.firecracker import HttpResponse
from squibd.snapshot.paths import validate_path

from ._listener import LISTEN_BACKLOG, _remove_if_stale
from ._peercred import PeerCredentials, is_allowed, peer_credentials

__all__ = [
    "API_SOCKET_MODE",
    "MAX_HEADER_BYTES",
    "MAX_PAYLOAD_BYTES",
    "FirecrackerSockets",
    "HttpApp",
    "bind_api_socket",
    "serve_http",
]

log = logging.getLogger("squibd.firecracker")

#: SPEC section 10: sockets are created with mode 0600.
API_SOCKET_MODE: Final = 0o600
#: Firecracker's API server refuses bodies over 51200 bytes (its default
#: ``--http-api-max-payload-size``).
MAX_PAYLOAD_BYTES: Final = 51200
#: Request line plus headers.
MAX_HEADER_BYTES: Final = 16 * 1024
#: A peer that does not take its answer within this is disconnected.
WRITE_TIMEOUT_S: Final = 10.0
_RECEIVE_SIZE: Final = 64 * 1024
#: How long a refused peer's remaining input is drained before the close.
_DRAIN_TIMEOUT_S: Final = 1.0
_HTTP_OK: Final = 200
_HTTP_NO_CONTENT: Final = 204
_HTTP_BAD_REQUEST: Final = 400
_HTTP_FORBIDDEN: Final = 403
_SERVER_NAME: Final = b"squibd (Firecracker API)"
_UNKNOWN_PEER: Final = PeerCredentials(-1, -1, -1)


class HttpApp(Protocol):
    """What a socket serves: one request in, one response out."""

    async def handle(self, method: str, path: str, body: bytes) -> HttpResponse:
        """Answer ``method path`` with ``body`` (raw bytes, maybe empty)."""
        ...


def bind_api_socket(path: str) -> socket.socket:
    """Create, bind (mode 0600) and listen on a Firecracker API socket at ``path``.

    Unlike :func:`~squibd.server.bind_unix_socket` this never touches the
    process-wide umask (the daemon binds these while worker threads create
    files): the mode is set on the socket before ``bind``, which Linux
    applies to the socket file it creates. The parent directory must exist.

    Raises:
        InvalidPath: the path breaks SPEC section 10 (107 bytes for a socket).
        DaemonAlreadyRunning: something listens on ``path``.
        SocketPathOccupied: ``path`` exists and is not a socket.
        OSError: bind/listen failed.
    """
    validate_path(path, what="api_socket", socket=True)
    _remove_if_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        os.fchmod(sock.fileno(), API_SOCKET_MODE)
        sock.bind(path)
        os.chmod(path, API_SOCKET_MODE)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _fault(status: int, message: str) -> HttpResponse:
    return HttpResponse(status, {"fault_message": message})


class _PeerGone(Exception):
    """The peer closed, stalled or broke the protocol: drop the connection."""


@attrs.define(eq=False)
class _HttpConnection:
    stream: trio.SocketStream
    app: HttpApp
    peer: PeerCredentials
    allowed: bool
    idle_timeout_s: float
    h11_conn: h11.Connection = attrs.field(
        factory=lambda: h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    )

    async def run(self) -> None:
        try:
            while True:
                request = await self._next_request()
                if request is None:
                    return
                method, path, body = request
                started = time.monotonic()
                if not self.allowed:
                    response = _fault(
                        _HTTP_FORBIDDEN,
                        f"uid {self.peer.uid} is not allowed to use this squibd; "
                        "ask its operator to add it to allowed_uids",
                    )
                else:
                    response = await self.app.handle(method, path, body)
                await self._send(response, close=not self.allowed)
                log.info(
                    "peer=%s http=%s %s status=%d duration_ms=%.1f",
                    self.peer, method, path, response.status,
                    (time.monotonic() - started) * 1000.0,
                )  # fmt: skip
                if not self._next_cycle():
                    return
        except _PeerGone:
            return
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _receive(self) -> None:
        with trio.move_on_after(self.idle_timeout_s) as scope:
            try:
                data = await self.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _PeerGone from exc
        if scope.cancelled_caught:
            raise _PeerGone
        self.h11_conn.receive_data(data)

    async def _next_event(self) -> Any:
        while True:
            try:
                event = self.h11_conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._refuse_protocol(exc)
                raise _PeerGone from exc
            if event is h11.NEED_DATA:
                await self._receive()
                continue
            return event

    async def _next_request(self) -> tuple[str, str, bytes] | None:
        event = await self._next_event()
        if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 orders events
            raise _PeerGone
        method = event.method.decode("ascii", "replace")
        target = event.target.decode("ascii", "replace")
        path = target.split("?", 1)[0]
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_PAYLOAD_BYTES:
                    message = (
                        f"Request payload is larger than the limit of {MAX_PAYLOAD_BYTES} "
                        "bytes allowed by the server"
                    )
                    await self._send(_fault(_HTTP_BAD_REQUEST, message), close=True)
                    await self._drain()
                    raise _PeerGone
            elif isinstance(part, h11.EndOfMessage):
                return method, path, bytes(body)
            else:  # ConnectionClosed mid-body
                raise _PeerGone

    async def _refuse_protocol(self, exc: h11.RemoteProtocolError) -> None:
        if self.h11_conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with contextlib.suppress(_PeerGone, h11.LocalProtocolError):
            await self._send(_fault(_HTTP_BAD_REQUEST, f"Invalid HTTP request: {exc}"), close=True)
            await self._drain()

    async def _drain(self) -> None:
        # After a refusal that closes the connection: read what the peer still
        # sends (bounded) before closing, because closing a Unix socket with
        # unread data makes the peer's read fail before it sees the answer.
        with trio.move_on_after(_DRAIN_TIMEOUT_S):
            try:
                await self.stream.send_eof()
                while await self.stream.receive_some(_RECEIVE_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _send(self, response: HttpResponse, *, close: bool = False) -> None:
        headers: list[tuple[bytes, bytes]] = [(b"Server", _SERVER_NAME)]
        payload = b""
        if response.body is not None:
            payload = json.dumps(response.body).encode()
            headers += [
                (b"Content-Type", b"application/json"),
                (b"Content-Length", str(len(payload)).encode()),
            ]
        elif response.status != _HTTP_NO_CONTENT:
            headers.append((b"Content-Length", b"0"))
        if close:
            headers.append((b"Connection", b"close"))
        data = self.h11_conn.send(h11.Response(status_code=response.status, headers=headers))
        if payload:
            data += self.h11_conn.send(h11.Data(data=payload))
        data += self.h11_conn.send(h11.EndOfMessage())
        with trio.move_on_after(WRITE_TIMEOUT_S) as scope:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _PeerGone from exc
        if scope.cancelled_caught:
            raise _PeerGone

    def _next_cycle(self) -> bool:
        conn = self.h11_conn
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            return True
        return False


async def serve_http(
    sock: socket.socket,
    app: HttpApp,
    *,
    allowed_uids: Collection[int],
    allowed_gids: Collection[int] = (),
    idle_timeout_s: float = 300.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on the listening Unix socket ``sock`` until cancelled.

    Reports through ``task_status`` once accepting. Does not close ``sock``.
    """
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: log, back off briefly
                log.error("accept failed on a Firecracker API socket: %s", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(
                _serve_connection, stream, app, allowed_uids, allowed_gids, idle_timeout_s
            )


async def _serve_connection(
    stream: trio.SocketStream,
    app: HttpApp,
    allowed_uids: Collection[int],
    allowed_gids: Collection[int],
    idle_timeout_s: float,
) -> None:
    try:
        peer = peer_credentials(stream.socket)  # type: ignore[arg-type]
    except OSError:
        peer = _UNKNOWN_PEER
    allowed = is_allowed(peer, allowed_uids, allowed_gids)
    if not allowed:
        log.warning("refused Firecracker API connection from %s: not in the allow list", peer)
    try:
        await _HttpConnection(stream, app, peer, allowed, idle_timeout_s).run()
    except Exception:  # one connection's bug never takes the socket down
        log.exception("Firecracker API connection from %s failed", peer)


@attrs.define(eq=False)
class _OpenSocket:
    path: str
    sock: socket.socket
    scope: trio.CancelScope


@attrs.define(eq=False)
class FirecrackerSockets:
    """Per-VM Firecracker API sockets of a running daemon (``vm.create``'s ``api_socket``).

    Args:
        nursery: where the socket tasks run (the server's connection nursery).
        app_for: builds the app serving one VM's socket.
        allowed_uids, allowed_gids: the peer allow list (SPEC section 10).
        idle_timeout_s: idle connections are closed after this.
    """

    nursery: trio.Nursery
    app_for: Callable[[str], HttpApp]
    allowed_uids: Collection[int]
    allowed_gids: Collection[int] = ()
    idle_timeout_s: float = 300.0
    _open: dict[str, _OpenSocket] = attrs.field(init=False, factory=dict)

    async def open_api_socket(self, vm_id: str, path: str) -> None:
        """Bind ``path`` (mode 0600) and serve ``vm_id``'s Firecracker API on it.

        Raises:
            DaemonAlreadyRunning: something listens on ``path``.
            SocketPathOccupied: ``path`` exists and is not a socket.
            OSError: bind failed.
        """
        if vm_id in self._open:
            raise ValueError(f"VM {vm_id!r} already has a Firecracker API socket")
        sock = await trio.to_thread.run_sync(lambda: bind_api_socket(path))
        scope = trio.CancelScope()
        self._open[vm_id] = _OpenSocket(path, sock, scope)
        app = self.app_for(vm_id)

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await serve_http(
                        sock, app, allowed_uids=self.allowed_uids,
                        allowed_gids=self.allowed_gids, idle_timeout_s=self.idle_timeout_s,
                        task_status=task_status,
                    )  # fmt: skip
            finally:
                # Closed here, once trio no longer waits on it (the file is
                # unlinked by _close right away, so the path can be reused).
                sock.close()

        await self.nursery.start(run)
        log.info("serving VM %s's Firecracker API on %s", vm_id, path)

    async def close_api_socket(self, vm_id: str) -> None:
        """Stop serving ``vm_id``'s socket and remove its file (no-op when it has none)."""
        entry = self._open.pop(vm_id, None)
        if entry is not None:
            self._close(entry)

    def path_of(self, vm_id: str) -> str | None:
        """The API socket path of ``vm_id``, if it has one."""
        entry = self._open.get(vm_id)
        return None if entry is None else entry.path

    def close_all(self) -> None:
        """Stop every socket and remove the files (daemon stop)."""
        while self._open:
            _, entry = self._open.popitem()
            self._close(entry)

    @staticmethod
    def _close(entry: _OpenSocket) -> None:
        entry.scope.cancel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
