"""One client connection: read lines, start calls, write answers.

Theory of operation
-------------------
A :class:`ClientConnection` runs one reader task (owned by the server's
connection nursery). Each request it reads becomes a *call* task started in
the server's **call nursery**, not in the connection's: a client that goes
away mid-save does not cancel the save; its answer is simply dropped.

Limits keep one client from hurting the others:

* at most ``max_in_flight`` calls per connection: the reader stops reading
  (backpressure) until a slot frees up;
* the framing caps an unfinished line at ``max_line`` bytes;
* a connection with nothing in flight that sends nothing for
  ``idle_timeout_s`` is closed;
* a client that stops reading its answers for ``WRITE_TIMEOUT_S`` is
  disconnected instead of blocking the call that answers it;
* at most ``SEND_BUDGET`` bytes of answers may wait to be sent: past that
  the reader stops reading until the client has read some (a client that
  floods batches of cheap calls and never reads holds the daemon's memory
  to the budget, not to what it sent).

Nothing a peer sends may take the daemon down: every call and every
connection has an error boundary. An unexpected exception is logged with its
traceback and an incident id, the request is answered -32603 (naming the
incident, never a Python class), and at worst this one connection is closed.

A stalled half line only ever blocks this connection's own reader.

Long calls (``MethodSpec.long_running``) may carry ``progress_token``:
``$/progress`` notifications are coalesced by a :class:`_ProgressPump`
(the latest value wins) and always precede the call's answer.
``$/cancelRequest {id}`` cancels such a call's cancel scope; the runtime
rolls back and the call answers -32800. The cancel scope is registered when
the request is read, so a cancel in the same read or the same batch as its
request finds it.

Each request is logged in one line: at DEBUG level for the cheap read-only
methods (``MethodSpec.read_only``), at INFO for the others.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import outcome
import trio

from squibd.api import (
    ApiContext,
    CallInfo,
    UnexpectedHandlerError,
    cancelled_error,
    dispatch,
)
from squibd.api.errors import internal_error
from squibd.api.methods import METHODS
from squibd.rpc import (
    BUSY,
    END,
    NEED_DATA,
    Batch,
    ErrorObject,
    ErrorResponse,
    Invalid,
    Notification,
    Request,
    RequestId,
    Response,
    Role,
    RpcConnection,
    RpcError,
    application_error,
    encode,
)

from ._peercred import PeerCredentials

if TYPE_CHECKING:
    from ._server import Server

__all__ = ["SEND_BUDGET", "WRITE_TIMEOUT_S", "ClientConnection"]

log = logging.getLogger("squibd.server")

#: Bytes asked of the kernel per receive (a typical socket buffer share).
RECEIVE_SIZE: Final = 64 * 1024
#: A client that does not read its answers for this long is disconnected.
WRITE_TIMEOUT_S: Final = 30.0
#: Bytes of answers a connection may have waiting to be sent before its reader pauses.
SEND_BUDGET: Final = 1024 * 1024
#: The last resort when even an error answer cannot be encoded (it names no id).
_UNENCODABLE: Final = (
    b'{"jsonrpc":"2.0","id":null,"error":{"code":-32603,'
    b'"message":"Internal error: an answer could not be encoded"}}\n'
)
_MS_PER_S: Final = 1000.0
CANCEL_METHOD: Final = "$/cancelRequest"
PROGRESS_METHOD: Final = "$/progress"


class _ProgressPump:
    """Coalesces progress reports of one call into ``$/progress`` notifications."""

    def __init__(self, token: int | str, send: Callable[[bytes], Any], rpc: RpcConnection):
        self._token = token
        self._send = send
        self._rpc = rpc
        self._latest: tuple[str, int, int] | None = None
        self._wakeup = trio.Event()
        self._closed = False

    def report(self, phase: str, done: int, total: int) -> None:
        """Record the latest progress (called on the trio thread)."""
        self._latest = (phase, done, total)
        self._wakeup.set()

    def close(self) -> None:
        """Flush what is pending and stop."""
        self._closed = True
        self._wakeup.set()

    async def run(self) -> None:
        """Send the latest progress each time the writer is free."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            if self._latest is not None:
                phase, done, total = self._latest
                self._latest = None
                params = {"token": self._token, "phase": phase, "done": done, "total": total}
                await self._send(self._rpc.send_notification(PROGRESS_METHOD, params))
            if self._closed:
                return


@attrs.define(eq=False)
class ClientConnection:
    """A connected client; see the module docstring."""

    server: Server
    stream: trio.SocketStream
    peer: PeerCredentials
    rpc: RpcConnection = attrs.field(init=False)
    slots: trio.Semaphore = attrs.field(init=False)
    _send_lock: trio.Lock = attrs.field(init=False, factory=trio.Lock)
    _scopes: dict[RequestId, tuple[trio.CancelScope, bool]] = attrs.field(init=False, factory=dict)
    _active: int = attrs.field(init=False, default=0)
    _drained: trio.Event = attrs.field(init=False, factory=trio.Event)
    _broken: bool = attrs.field(init=False, default=False)
    _unsent: int = attrs.field(init=False, default=0)
    _room: trio.Event = attrs.field(init=False, factory=trio.Event)

    def __attrs_post_init__(self) -> None:
        config = self.server.config.server
        self.rpc = RpcConnection(Role.SERVER, max_line=config.max_line_bytes)
        self.slots = trio.Semaphore(config.max_in_flight)
        self._drained.set()

    @property
    def api(self) -> ApiContext:
        """The daemon's API context."""
        return self.server.api

    # -- writing ------------------------------------------------------------

    @property
    def unsent(self) -> int:
        """Bytes of answers handed to :meth:`send` and not yet written."""
        return self._unsent

    async def send(self, data: bytes) -> None:
        """Write ``data``; a gone or stuck client is dropped, never an error for the caller.

        The bytes count against :data:`SEND_BUDGET` until written or dropped.
        """
        if not data:
            return
        self._reserve(len(data))
        try:
            await self._write(data)
        finally:
            self._release(len(data))

    def send_soon(self, data: bytes, then: Callable[[], None]) -> None:
        """Send ``data`` from a task of its own; ``then()`` runs once it is written or dropped.

        The bytes count against the budget from this call on, so a reader that
        queues answers this way stops reading as soon as the budget is spent.
        """
        self._reserve(len(data))

        async def task() -> None:
            try:
                await self._write(data)
            finally:
                self._release(len(data))
                then()

        self.server.start_task(task)

    def _reserve(self, size: int) -> None:
        self._unsent += size

    def _release(self, size: int) -> None:
        self._unsent -= size
        if self._unsent <= SEND_BUDGET:
            self._room.set()

    async def _wait_for_room(self) -> None:
        # Backpressure: read nothing more while too many answers wait to be sent.
        while self._unsent > SEND_BUDGET and not self._broken:
            self._room = trio.Event()
            await self._room.wait()

    def abort(self) -> None:
        """Drop the client now (after an unexpected failure on this connection)."""
        self._broken = True
        self._room.set()
        with contextlib.suppress(Exception):
            self.stream.socket.close()

    async def _write(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            # Uncontended: take the lock without a scheduling round (send_all checkpoints).
            self._send_lock.acquire_nowait()
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            with trio.move_on_after(WRITE_TIMEOUT_S) as scope:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._broken = True
            if scope.cancelled_caught:
                log.warning("peer %s does not read its answers; disconnecting", self.peer)
                self._broken = True
                await trio.aclose_forcefully(self.stream)
        finally:
            self._send_lock.release()

    # -- reading ------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until EOF, idle timeout or daemon stop; then close it."""
        try:
            await self._read_loop()
            await self._drained.wait()  # half-closed clients still get their answers
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _read_loop(self) -> None:
        idle = self.server.config.server.idle_timeout_s
        while True:
            await self._wait_for_room()
            if self._broken:
                return
            event = self.rpc.next_event()
            if event is END:
                return
            if event is NEED_DATA:
                deadline = idle if self._active == 0 else math.inf
                with trio.move_on_after(deadline) as scope:
                    try:
                        data = await self.stream.receive_some(RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        data = b""
                if scope.cancelled_caught:
                    if self._active == 0:
                        log.info("closing idle connection of %s", self.peer)
                        return
                    continue
                self.rpc.receive_data(data)
                continue
            if isinstance(event, Batch):
                await self._start_batch(event)
            else:
                answer = await self._start_one(event, None)
                if answer is not None:
                    await self.send(self._frame(answer))

    async def _start_one(
        self, message: Any, batch: _BatchCollector | None
    ) -> Response | ErrorResponse | None:
        """Handle one message; returns an immediate answer, or None (started, or no answer)."""
        if isinstance(message, Invalid):
            self.server.log_request(self.peer, "-", message.id, 0.0, message.error)
            return ErrorResponse(message.id, message.error)
        if isinstance(message, Notification):
            self._notification(message)
            return None
        if not isinstance(message, Request):  # responses are turned into Invalid by rpc
            return None
        if self.server.stopping:
            error = application_error(
                BUSY, "ShuttingDown", "squibd is shutting down; retry when it is back"
            )
            return ErrorResponse(message.id, error.error)
        spec = METHODS.get(message.method)
        if spec is not None and spec.inline:
            return await self._answer_inline(message)
        await self.slots.acquire()
        # Registered now, not when the call task starts: a $/cancelRequest read right
        # after this request (same read, same batch) must find it.
        scope = trio.CancelScope()
        self._scopes[message.id] = (scope, spec is not None and spec.long_running)
        self._call_started()
        self.server.start_call(self._call, message, batch, scope)
        return None

    async def _start_batch(self, batch: Batch) -> None:
        collector = _BatchCollector(self)
        self._call_started()  # the batch's answer line counts as one more answer to send
        for item in batch.items:
            collector.expect()
            answer = await self._start_one(item, collector)
            if answer is not None or not isinstance(item, Request):
                collector.deliver(answer)
        collector.sealed()

    def _notification(self, message: Notification) -> None:
        if message.method != CANCEL_METHOD:
            log.debug("ignoring notification %.64r from %s", message.method, self.peer)
            return
        params = message.params if isinstance(message.params, dict) else {}
        target = params.get("id")
        valid = isinstance(target, int | str) and not isinstance(target, bool)  # True is not 1
        entry = self._scopes.get(target) if valid else None  # type: ignore[arg-type]
        if entry is None:
            # DEBUG: notifications get no answer, so nothing paces a client sending them.
            log.debug("%s: $/cancelRequest for %.64r, which is not running", self.peer, target)
            return
        scope, cancellable = entry
        if cancellable:
            log.info("%s: cancelling request %r", self.peer, target)
            scope.cancel()

    # -- calls (run in the server's call nursery) ------------------------------

    async def _call(
        self, request: Request, batch: _BatchCollector | None, scope: trio.CancelScope
    ) -> None:
        try:
            try:
                answer = await self._answer(request, scope)
            except Exception as exc:  # the call's error boundary: a bug answers -32603
                answer = ErrorResponse(request.id, self._unexpected(request, exc))
            if batch is not None:
                batch.deliver(answer)
            else:
                await self.send(self._frame(answer))
        except Exception as exc:  # answering failed: this connection cannot be trusted
            log.error("%s: answering %s failed; closing the connection", self.peer,
                      request.method, exc_info=exc)  # fmt: skip
            self.abort()
        finally:
            self.slots.release()
            self._call_done()

    async def _answer(self, request: Request, scope: trio.CancelScope) -> Response | ErrorResponse:
        started = time.monotonic()
        spec = METHODS.get(request.method)
        long_running = spec is not None and spec.long_running
        answer: Response | ErrorResponse
        failure: ErrorObject | None = None
        try:
            token = None
            if long_running and isinstance(request.params, dict):
                raw = request.params.get("progress_token")
                if isinstance(raw, int | str) and not isinstance(raw, bool):
                    token = raw
            if scope.cancel_called:  # cancelled before it started: nothing to roll back
                failure = cancelled_error(request.id).error
                answer = ErrorResponse(request.id, failure)
            else:
                with scope:
                    result = await self._dispatch(request, token)
                if scope.cancelled_caught:
                    failure = cancelled_error(request.id).error
                    answer = ErrorResponse(request.id, failure)
                else:
                    answer = Response(request.id, result)
        except (RpcError, UnexpectedHandlerError) as exc:
            failure = self._failure(request, exc)
            answer = ErrorResponse(request.id, failure)
        finally:
            self._scopes.pop(request.id, None)
        self._log_request(request, started, failure)
        return answer

    async def _answer_inline(self, request: Request) -> Response | ErrorResponse:
        # No I/O and no waiting: answered on the reader task, with nothing to cancel.
        started = time.monotonic()
        failure: ErrorObject | None = None
        try:
            answer: Response | ErrorResponse = Response(
                request.id,
                await dispatch(self.api, CallInfo(request.id), request.method, request.params),
            )
        except (RpcError, UnexpectedHandlerError) as exc:
            failure = self._failure(request, exc)
            answer = ErrorResponse(request.id, failure)
        except Exception as exc:  # the call's error boundary
            failure = self._unexpected(request, exc)
            answer = ErrorResponse(request.id, failure)
        self._log_request(request, started, failure)
        return answer

    def _unexpected(self, request: Request, exc: Exception) -> ErrorObject:
        error = internal_error(exc).error
        log.error("%s %s failed unexpectedly (%s)", self.peer, request.method, error.message,
                  exc_info=exc)  # fmt: skip
        return error

    def _failure(self, request: Request, exc: RpcError | UnexpectedHandlerError) -> ErrorObject:
        # The error object answering a failed call; a handler bug is logged with its traceback.
        if isinstance(exc, UnexpectedHandlerError):
            log.error("%s %s failed unexpectedly (%s)", self.peer, request.method,
                      exc.rpc_error.error.message, exc_info=exc)  # fmt: skip
            return exc.rpc_error.error
        return exc.error

    def _log_request(self, request: Request, started: float, failure: ErrorObject | None) -> None:
        elapsed = (time.monotonic() - started) * _MS_PER_S
        spec = METHODS.get(request.method)
        level = logging.DEBUG if spec is not None and spec.read_only else logging.INFO
        self.server.log_request(
            self.peer, request.method, request.id, elapsed, failure, level=level
        )

    def _encodable(self, answer: Response | ErrorResponse) -> Response | ErrorResponse:
        """``answer``, or -32603 in its place when JSON cannot carry it (a bug, logged)."""
        try:
            encode(answer.to_json())
        except (ValueError, TypeError) as exc:
            error = internal_error(exc).error
            log.error("answer to %r is not JSON-encodable (%s)", answer.id, error.message,
                      exc_info=exc)  # fmt: skip
            return ErrorResponse(answer.id, error)
        return answer

    def _frame(self, answer: Response | ErrorResponse) -> bytes:
        """Encode an answer; a result JSON cannot carry becomes -32603 (a bug, logged)."""
        try:
            return self.rpc.send_response(self._encodable(answer))
        except (ValueError, TypeError):  # not even the error: settle the id, answer id null
            with contextlib.suppress(Exception):
                self.rpc.send_response(ErrorResponse(answer.id, internal_error().error))
            return _UNENCODABLE

    def frame_batch(self, answers: list[Response | ErrorResponse]) -> bytes:
        """Encode a batch's answers as one line (each unencodable one becomes -32603)."""
        return self.rpc.send_batch([self._encodable(answer) for answer in answers])

    def cancel_calls(self) -> None:
        """Cancel every running call of this connection (daemon stop after the grace period)."""
        for scope, _cancellable in self._scopes.values():
            scope.cancel()

    def _call_started(self) -> None:
        self._active += 1
        self._drained = trio.Event()

    def _call_done(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._drained.set()

    async def _dispatch(self, request: Request, token: int | str | None) -> Any:
        if token is None:
            return await dispatch(self.api, CallInfo(request.id), request.method, request.params)
        pump = _ProgressPump(token, self.send, self.rpc)
        call = CallInfo(request.id, pump.report)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run)
            try:
                # Captured so that the error is not wrapped in the nursery's ExceptionGroup.
                result = await outcome.acapture(
                    dispatch, self.api, call, request.method, request.params
                )
            finally:
                pump.close()
        return result.unwrap()


class _BatchCollector:
    """Gathers the answers of one batch and sends them as one array line."""

    def __init__(self, connection: ClientConnection) -> None:
        self._connection = connection
        self._answers: list[Response | ErrorResponse] = []
        self._pending = 0
        self._sealed = False

    def expect(self) -> None:
        self._pending += 1

    def deliver(self, answer: Response | ErrorResponse | None) -> None:
        self._pending -= 1
        if answer is not None:
            self._answers.append(answer)
        self._maybe_send()

    def sealed(self) -> None:
        self._sealed = True
        self._maybe_send()

    def _maybe_send(self) -> None:
        if self._sealed and self._pending == 0:
            self._sealed = False  # send once
            connection = self._connection
            data = connection.frame_batch(self._answers)
            if data:
                connection.send_soon(data, connection._call_done)
            else:
                connection._call_done()
