"""The async client, on anyio: runs under trio and under asyncio alike."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final

import anyio
import anyio.abc

from ._common import (
    CANCEL_REQUEST,
    PROGRESS,
    DaemonUnreachable,
    ProgressCallback,
    SquibdError,
    TypedMethods,
    default_socket_path,
    messages,
    notification,
    progress_args,
    request,
)

__all__ = ["AsyncClient"]

_RECEIVE: Final = 64 * 1024


class _Pending:
    __slots__ = ("done", "message")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.message: dict[str, Any] | None = None


class AsyncClient(TypedMethods[Awaitable[Any]]):
    """An async squibd client; concurrent calls share one connection.

    ::

        async with AsyncClient() as squibd:
            status = await squibd.daemon_status()

    Cancelling a call (its cancel scope, ``asyncio`` task cancel, a timeout) sends
    ``$/cancelRequest`` so the daemon rolls the operation back.
    """

    def __init__(self, socket_path: str | None = None) -> None:
        self.socket_path = socket_path or default_socket_path()
        self._stream: anyio.abc.ByteStream | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._pending: dict[int, _Pending] = {}
        self._progress: dict[str, ProgressCallback] = {}
        self._ids = itertools.count(1)
        self._lock = anyio.Lock()
        self._closed = False

    async def __aenter__(self) -> AsyncClient:
        try:
            self._stream = await anyio.connect_unix(self.socket_path)
        except OSError as exc:
            raise DaemonUnreachable(
                f"cannot connect to squibd at {self.socket_path}: {exc.strerror or exc}"
            ) from exc
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._reader)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        assert self._group is not None and self._stream is not None
        self._group.cancel_scope.cancel()
        await self._group.__aexit__(None, None, None)
        await self._stream.aclose()

    async def _reader(self) -> None:
        assert self._stream is not None
        buffer = b""
        try:
            while True:
                try:
                    chunk = await self._stream.receive(_RECEIVE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    for message in messages(line):
                        self._route(message)
        finally:
            self._closed = True
            for pending in self._pending.values():
                pending.done.set()

    def _route(self, message: dict[str, Any]) -> None:
        if message.get("method") == PROGRESS:
            args = progress_args(message.get("params"))
            if args is not None:
                callback = self._progress.get(args[0])
                if callback is not None:
                    callback(*args[1:])
            return
        request_id = message.get("id")
        pending = self._pending.get(request_id) if isinstance(request_id, int) else None
        if pending is not None:
            pending.message = message
            pending.done.set()

    async def _send(self, data: bytes) -> None:
        if self._stream is None:
            raise RuntimeError("use 'async with AsyncClient(...)' before calling")
        async with self._lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                raise DaemonUnreachable(f"squibd at {self.socket_path}: {exc}") from exc

    async def cancel(self, request_id: int) -> None:
        """Ask the daemon to cancel a running call (``$/cancelRequest``)."""
        await self._send(notification(CANCEL_REQUEST, {"id": request_id}))

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        on_sent: Callable[[int], None] | None = None,
    ) -> Any:
        """Call ``method`` with ``params`` and return its result.

        Args:
            on_progress: receives ``(phase, done, total)`` from ``$/progress``.
            on_sent: receives the request id once sent (for :meth:`cancel`).

        Raises:
            SquibdError: the daemon answered an error (``cancelled`` after a cancel).
            DaemonUnreachable: the connection closed before the answer.
        """
        params = dict(params or {})
        request_id = next(self._ids)
        token = None
        if on_progress is not None:
            token = f"a{request_id}"
            params["progress_token"] = token
            self._progress[token] = on_progress
        pending = self._pending[request_id] = _Pending()
        try:
            await self._send(request(request_id, method, params))
            if on_sent is not None:
                on_sent(request_id)
            try:
                await pending.done.wait()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True):
                    if not self._closed:
                        await self.cancel(request_id)
                raise
        finally:
            del self._pending[request_id]
            if token is not None:
                del self._progress[token]
        message = pending.message
        if message is None:
            raise DaemonUnreachable(
                f"squibd at {self.socket_path} closed the connection before answering"
            )
        if "error" in message:
            raise SquibdError.from_json(message["error"], method)
        return message.get("result")

    def _invoke(
        self, method: str, params: dict[str, Any], on_progress: ProgressCallback | None = None
    ) -> Awaitable[Any]:
        return self.call(method, params, on_progress=on_progress)
