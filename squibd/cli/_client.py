"""A small trio JSON-RPC client for squibd's socket (used by squibctl, the demo and tests).

One :class:`RpcClient` multiplexes concurrent calls on one connection: a
reader task routes each response to its waiting call by id, and
``$/progress`` notifications to the callback registered for their token.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

import attrs
import trio

from squibd.rpc import (
    END,
    NEED_DATA,
    Batch,
    ErrorObject,
    ErrorResponse,
    Notification,
    Response,
    Role,
    RpcConnection,
)

__all__ = ["CallFailed", "DaemonUnreachable", "RpcClient", "open_client"]

_RECEIVE_SIZE: Final = 64 * 1024
_PROGRESS: Final = "$/progress"
_CANCEL: Final = "$/cancelRequest"

ProgressCallback = Callable[[str, int, int], None]


class CallFailed(Exception):
    """The daemon answered a call with an error; ``error`` is the error object."""

    def __init__(self, error: ErrorObject) -> None:
        super().__init__(error.fault_message)
        self.error = error


class DaemonUnreachable(Exception):
    """No daemon answers on the socket (not running, wrong path, no permission)."""


@attrs.define(eq=False)
class _Pending:
    done: trio.Event = attrs.field(factory=trio.Event)
    answer: Response | ErrorResponse | None = None


@attrs.define(eq=False)
class RpcClient:
    """A connected client; create it with :func:`open_client`."""

    stream: trio.SocketStream
    rpc: RpcConnection = attrs.field(factory=lambda: RpcConnection(Role.CLIENT))
    _pending: dict[int | str, _Pending] = attrs.field(factory=dict)
    _progress: dict[int | str, ProgressCallback] = attrs.field(factory=dict)
    _tokens: itertools.count[int] = attrs.field(factory=lambda: itertools.count(1))
    _send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    _closed: bool = False

    async def _reader(self) -> None:
        try:
            while True:
                event = self.rpc.next_event()
                if event is NEED_DATA:
                    self.rpc.receive_data(await self.stream.receive_some(_RECEIVE_SIZE))
                    continue
                if event is END:
                    return
                items = event.items if isinstance(event, Batch) else (event,)
                for item in items:
                    self._route(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self._closed = True
            for pending in self._pending.values():
                pending.done.set()

    def _route(self, item: object) -> None:
        if isinstance(item, Response | ErrorResponse) and item.id is not None:
            pending = self._pending.get(item.id)
            if pending is not None:
                pending.answer = item
                pending.done.set()
        elif isinstance(item, Notification) and item.method == _PROGRESS:
            params = item.params if isinstance(item.params, dict) else {}
            callback = self._progress.get(params.get("token"))  # type: ignore[arg-type]
            if callback is not None:
                callback(str(params.get("phase")), int(params["done"]), int(params["total"]))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are (tests use this for malformed input)."""
        async with self._send_lock:
            await self.stream.send_all(data)

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        """Send a notification."""
        await self.send_raw(self.rpc.send_notification(method, params))

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> Any:
        """Call ``method`` and return its result.

        Args:
            on_progress: receives ``$/progress`` (a ``progress_token`` is added).
            on_sent: receives the request id once it is sent (to cancel it later).

        Raises:
            CallFailed: the daemon answered an error.
            DaemonUnreachable: the connection closed before the answer.
        """
        params = dict(params or {})
        token = None
        if on_progress is not None:
            token = f"p{next(self._tokens)}"
            params["progress_token"] = token
            self._progress[token] = on_progress
        request_id, data = self.rpc.send_request(method, params)
        pending = self._pending[request_id] = _Pending()
        try:
            await self.send_raw(data)
            if on_sent is not None:
                on_sent(request_id)
            await pending.done.wait()
        finally:
            del self._pending[request_id]
            if token is not None:
                del self._progress[token]
        answer = pending.answer
        if answer is None:
            raise DaemonUnreachable("the daemon closed the connection before answering")
        if isinstance(answer, ErrorResponse):
            raise CallFailed(answer.error)
        return answer.result

    async def cancel(self, request_id: int) -> None:
        """Ask the daemon to cancel a running call (``$/cancelRequest``)."""
        await self.notify(_CANCEL, {"id": request_id})


async def connect_stream(path: str) -> trio.SocketStream:
    """Connect to the daemon's socket.

    Raises:
        DaemonUnreachable: naming the path and the OS error.
    """
    try:
        return await trio.open_unix_socket(path)
    except OSError as exc:
        raise DaemonUnreachable(
            f"cannot connect to squibd at {path}: {exc.strerror or exc}"
        ) from exc


@asynccontextmanager
async def open_client(path: str) -> AsyncIterator[RpcClient]:
    """Connect to ``path`` and yield a client; closes the connection on exit."""
    stream = await connect_stream(path)
    client = RpcClient(stream)
    try:
        async with stream, trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The reader never fails, so a lone error is the caller's own: give it back unwrapped.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
