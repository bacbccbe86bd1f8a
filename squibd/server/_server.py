"""The daemon's trio server: listeners, connections, calls, stop.

Theory of operation
-------------------
:meth:`Server.serve` opens two nurseries:

* the **call nursery** (outer) runs every call; it outlives connections,
  so a client that disconnects mid-save does not cancel the save;
* the **connection nursery** (inner) runs the accept loops, one task per
  connection, the signal watcher and the watchdog.

Stopping (SIGTERM, SIGINT or :meth:`request_stop`): tell the service manager
``STOPPING=1``, stop accepting, refuse new requests, let calls in flight
finish for at most ``shutdown_grace_s``, cancel the rest (they roll back and
answer -32800), close the connections, destroy the VMs, remove the socket
file we created. The daemon then exits 0.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any, Final

import attrs
import trio

from squibd.api import ApiContext
from squibd.api.firecracker import FirecrackerApp
from squibd.config import DaemonConfig
from squibd.rpc import BUSY, NOT_ALLOWED, ErrorObject, ErrorResponse, Role, RpcConnection
from squibd.rpc import application_error as _app_error

from ._connection import ClientConnection
from ._firecracker import FirecrackerSockets
from ._notify import Notifier
from ._peercred import PeerCredentials, is_allowed, peer_credentials

__all__ = ["Server"]

log = logging.getLogger("squibd.server")

#: accept(2) errors that mean "out of resources, try again soon" (trio.serve_listeners's list).
_ACCEPT_CAPACITY_ERRNOS: Final = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: How long the accept loop backs off after such an error.
_ACCEPT_BACKOFF_S: Final = 0.1
#: Bound on the rollback of calls cancelled at stop.
_CANCEL_GRACE_S: Final = 10.0
#: How long a refused client gets to read its error answer.
_REFUSE_TIMEOUT_S: Final = 1.0
_DRAIN_SIZE: Final = 4096
_UNKNOWN_PEER: Final = PeerCredentials(-1, -1, -1)


@attrs.define(eq=False)
class Server:
    """Serves the JSON-RPC API on one or more listening Unix sockets.

    Args:
        config: the daemon configuration.
        api: the API context (VM runtime, debug flag, allowed roots).
        sockets: listening sockets (bound by us or passed by systemd/launchd).
        owned_paths: socket files we created and remove at stop.
        notifier: the service manager channel (sd_notify).
        handle_signals: stop on SIGTERM/SIGINT (main thread only).
    """

    config: DaemonConfig
    api: ApiContext
    sockets: list[socket.socket]
    owned_paths: list[str] = attrs.field(factory=list)
    notifier: Notifier = attrs.field(factory=Notifier)
    handle_signals: bool = True
    stopping: bool = attrs.field(init=False, default=False)
    _stop: trio.Event = attrs.field(init=False, factory=trio.Event)
    _calls: trio.Nursery | None = attrs.field(init=False, default=None)
    _connections: set[ClientConnection] = attrs.field(init=False, factory=set)
    _calls_running: int = attrs.field(init=False, default=0)
    _calls_idle: trio.Event = attrs.field(init=False, factory=trio.Event)
    _connection_count: int = attrs.field(init=False, default=0)

    # -- public ---------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        """Connections open now."""
        return self._connection_count

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM does)."""
        self._stop.set()

    async def serve(
        self, *, task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until stopped; reports ``self`` through ``task_status`` once accepting."""
        self._calls_idle.set()
        await self.api.startup()
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in self.sockets]
        try:
            async with trio.open_nursery() as calls:
                self._calls = calls
                async with trio.open_nursery() as conns:
                    self._firecracker_hook(conns)
                    accept_scope = trio.CancelScope()
                    for listener in listeners:
                        conns.start_soon(self._accept_loop, listener, conns, accept_scope)
                    if self.handle_signals:
                        await conns.start(self._watch_signals)
                    if self.notifier.watchdog_interval_s is not None:
                        conns.start_soon(self._watchdog, self.notifier.watchdog_interval_s)
                    self.notifier.notify(READY="1", STATUS="accepting connections")
                    log.info("squibd listening (pid %d)", os.getpid())
                    task_status.started(self)
                    await self._stop.wait()
                    await self._shut_down(accept_scope, listeners)
                    conns.cancel_scope.cancel()
        finally:
            if isinstance(self.api.api_sockets, FirecrackerSockets):
                self.api.api_sockets.close_all()
            with trio.CancelScope(shield=True):
                await self.api.aclose()
            for path in self.owned_paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            log.info("squibd stopped")

    # -- internals -------------------------------------------------------------

    def _firecracker_hook(self, conns: trio.Nursery) -> FirecrackerSockets:
        # Issue 14: vm.create's api_socket serves a VM's Firecracker REST API;
        # its listeners run in the connection nursery (they stop with it).
        server_config = self.config.server
        sockets = FirecrackerSockets(
            conns,
            lambda vm_id: FirecrackerApp.for_vm(self.api, vm_id),
            server_config.effective_allowed_uids(),
            server_config.allowed_gids,
            server_config.idle_timeout_s,
        )
        self.api.api_sockets = sockets
        return sockets

    async def _shut_down(
        self, accept_scope: trio.CancelScope, listeners: list[trio.SocketListener]
    ) -> None:
        self.stopping = True
        self.notifier.notify(STOPPING="1", STATUS="stopping: finishing calls in flight")
        log.info("stopping: %d call(s) in flight", self._calls_running)
        accept_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        with trio.move_on_after(self.config.server.shutdown_grace_s):
            await self._calls_idle.wait()
        if self._calls_running:
            log.warning("cancelling %d call(s) still running", self._calls_running)
            for conn in list(self._connections):
                conn.cancel_calls()
            with trio.move_on_after(_CANCEL_GRACE_S):
                await self._calls_idle.wait()

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                log.info("received %s", signal.Signals(signum).name)
                self.request_stop()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify(WATCHDOG="1")
            await trio.sleep(interval)

    async def _accept_loop(
        self, listener: trio.SocketListener, conns: trio.Nursery, scope: trio.CancelScope
    ) -> None:
        with scope:
            while True:
                try:
                    stream = await listener.accept()
                except trio.ClosedResourceError:
                    return
                except OSError as exc:
                    # Out of fds (EMFILE/ENFILE) or memory, or any other accept failure:
                    # the daemon and its VMs live on; new clients wait a moment.
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                    if exc.errno in _ACCEPT_CAPACITY_ERRNOS:
                        log.error("accept failed (%s); backing off", reason)
                    else:
                        log.exception("accept failed unexpectedly (%s); backing off", reason)
                    await trio.sleep(_ACCEPT_BACKOFF_S)
                    continue
                conns.start_soon(self._serve_connection, stream)

    async def _refuse(self, stream: trio.SocketStream, error: ErrorObject) -> None:
        # Answer one error line, then drain the peer's input before closing: closing a
        # Unix socket with unread data makes the peer's read fail with ECONNRESET
        # before it has seen the answer.
        rpc = RpcConnection(Role.SERVER)
        with trio.move_on_after(_REFUSE_TIMEOUT_S):
            try:
                await stream.send_all(rpc.send_response(ErrorResponse(None, error)))
                await stream.send_eof()
                while await stream.receive_some(_DRAIN_SIZE):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        await trio.aclose_forcefully(stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            peer = peer_credentials(stream.socket)  # type: ignore[arg-type]
        except OSError:
            peer = _UNKNOWN_PEER
        server_config = self.config.server
        if not is_allowed(peer, server_config.effective_allowed_uids(), server_config.allowed_gids):
            log.warning("refused connection from %s: not in the allow list", peer)
            message = (
                f"uid {peer.uid} is not allowed to use this squibd; "
                "ask its operator to add it to allowed_uids"
            )
            await self._refuse(stream, _app_error(NOT_ALLOWED, "NotAllowed", message).error)
            return
        if self._connection_count >= server_config.max_connections:
            log.warning("refused connection from %s: connection limit reached", peer)
            message = (
                f"squibd already serves {server_config.max_connections} connections; retry later"
            )
            await self._refuse(stream, _app_error(BUSY, "TooManyConnections", message).error)
            return
        conn = ClientConnection(self, stream, peer)
        self._connection_count += 1
        self._connections.add(conn)
        try:
            await conn.run()
        except Exception:  # the connection's error boundary: close it, keep the daemon
            log.exception("connection of %s failed unexpectedly; closing it", peer)
            conn.abort()
            await trio.aclose_forcefully(stream)
        finally:
            self._connections.discard(conn)
            self._connection_count -= 1

    def start_call(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run a call in the call nursery (counted for graceful stop)."""
        self.start_task(fn, *args)

    def start_task(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` in the call nursery, counted as in flight until it returns."""
        assert self._calls is not None, "serve() is not running"
        self._calls_running += 1
        self._calls_idle = trio.Event()
        self._calls.start_soon(self._counted, fn, *args)

    async def _counted(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception:  # a bug in one call must not take the daemon down
            log.exception("call task %s failed", getattr(fn, "__qualname__", fn))
        finally:
            self._calls_running -= 1
            if self._calls_running == 0:
                self._calls_idle.set()

    def log_request(
        self,
        peer: PeerCredentials,
        method: str,
        request_id: object,
        elapsed_ms: float,
        error: ErrorObject | None,
        *,
        level: int = logging.INFO,
    ) -> None:
        """The one log line of a request: peer, method, id, duration, outcome.

        ``level``: DEBUG for the cheap read-only methods, INFO for the rest.
        """
        if not log.isEnabledFor(level):
            return
        outcome = "ok" if error is None else f"error {error.code} {error.kind or ''}".rstrip()
        log.log(
            level,
            "peer=%s method=%s id=%s duration_ms=%.1f outcome=%s",
            peer, _clip(method), _clip(str(request_id)), elapsed_ms, outcome,
        )  # fmt: skip


#: A method name or request id longer than this is cut in the log (a peer chooses them).
_LOG_ID_MAX: Final = 64


def _clip(text: str) -> str:
    # A method name or id is the peer's choice: a 1 MiB one must not become 1 MiB of log.
    if len(text) > _LOG_ID_MAX:
        return f"{text[:_LOG_ID_MAX]!r}...({len(text)} chars)"
    return text
