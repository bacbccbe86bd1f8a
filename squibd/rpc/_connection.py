"""The sans-IO JSON-RPC connection: bytes in, events out; messages in, bytes out.

Theory of operation
-------------------
An :class:`RpcConnection` plays one :class:`Role`. It owns a
:class:`~squibd.rpc._framing.LineSplitter` and the id bookkeeping:

* as the **server**, every :class:`Request` it hands out is *in flight*
  until a response with its id is sent. A second request reusing an id that
  is still in flight is turned into an :class:`Invalid` (answered with id
  ``null`` so that the client cannot confuse it with the first answer).
  Sending a response for an id that is not in flight is a
  :class:`LocalProtocolError`.
* as the **client**, :meth:`send_request` allocates ids and remembers them;
  a response for an unknown id is a :class:`RemoteProtocolError`.

Nothing here does I/O: the caller feeds :meth:`receive_data` and writes
the bytes the ``send_*`` methods return.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from typing import Any, Final

from ._errors import INVALID_REQUEST, ErrorObject, LocalProtocolError, RemoteProtocolError
from ._framing import DEFAULT_MAX_LINE, LINE_TOO_LONG, LineSplitter, Signal
from ._messages import (
    Batch,
    ErrorResponse,
    Event,
    Invalid,
    Message,
    Notification,
    Request,
    RequestId,
    Response,
    encode,
    parse_line,
)

__all__ = ["DEFAULT_MAX_ANSWER_LINE", "Role", "RpcConnection"]

#: The client's default line cap: the longest answer squibd sends (a 1 MiB
#: ``vm.read_memory`` is about 1.4 MB of base64) with room to spare.
DEFAULT_MAX_ANSWER_LINE: Final = 4 * DEFAULT_MAX_LINE


class Role(enum.Enum):
    """Which side of the conversation a connection plays."""

    SERVER = "server"
    CLIENT = "client"


class RpcConnection:
    """JSON-RPC 2.0 over newline-framed JSON, without I/O.

    Args:
        role: server (answers requests) or client (sends them).
        max_line: the line cap of the framing. Default: SPEC section 9's 1 MiB
            for the server; :data:`DEFAULT_MAX_ANSWER_LINE` for the client, whose
            answers may be longer than the requests (``vm.read_memory`` returns
            1 MiB as base64).
    """

    def __init__(self, role: Role, *, max_line: int | None = None) -> None:
        self.role = role
        if max_line is None:
            max_line = DEFAULT_MAX_LINE if role is Role.SERVER else DEFAULT_MAX_ANSWER_LINE
        self._splitter = LineSplitter(max_line)
        self._in_flight: set[RequestId] = set()
        self._ids = itertools.count(1)

    @property
    def max_line(self) -> int:
        """The line cap in bytes."""
        return self._splitter.max_line

    @property
    def in_flight(self) -> frozenset[RequestId]:
        """Ids of requests received (server) or sent (client) and not yet answered."""
        return frozenset(self._in_flight)

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line held in memory."""
        return self._splitter.buffered

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; ``b""`` means the peer closed its side."""
        self._splitter.feed(data)

    def next_event(self) -> Event | Signal:
        """The next event, or :data:`NEED_DATA` / :data:`END`.

        Raises:
            RemoteProtocolError: (client role) a response to an unknown id.
        """
        while True:  # blank lines are skipped in a loop: a peer controls how many arrive
            line = self._splitter.next_line()
            if line is LINE_TOO_LONG:
                return Invalid(
                    None,
                    ErrorObject(
                        INVALID_REQUEST,
                        f"Invalid Request: line exceeds {self.max_line} bytes",
                        {"limit": self.max_line},
                    ),
                )
            if isinstance(line, Signal):
                return line
            if line.strip():
                break
        event = parse_line(line)
        if isinstance(event, Batch):
            return Batch(tuple(self._track(item) for item in event.items))
        return self._track(event)

    def _track(self, message: Message) -> Message:
        if self.role is Role.SERVER:
            if isinstance(message, Request):
                if message.id in self._in_flight:
                    return Invalid(
                        None,
                        ErrorObject(
                            INVALID_REQUEST,
                            f"Invalid Request: id {message.id!r} is already in flight",
                        ),
                    )
                self._in_flight.add(message.id)
            elif isinstance(message, Invalid) and message.id is not None:
                # Its error answer will carry the id, so the id is in flight until then
                # (or the answer goes out with id null if the id is already taken).
                if message.id in self._in_flight:
                    return Invalid(None, message.error)
                self._in_flight.add(message.id)
            elif isinstance(message, Response | ErrorResponse):
                return Invalid(
                    None,
                    ErrorObject(INVALID_REQUEST, "Invalid Request: the server sends no requests"),
                )
            return message
        if isinstance(message, Response | ErrorResponse) and message.id is not None:
            if message.id not in self._in_flight:
                raise RemoteProtocolError(f"response for unknown request id {message.id!r}")
            self._in_flight.discard(message.id)
        return message

    # -- sending ----------------------------------------------------------

    def _settle(self, message: Response | ErrorResponse) -> None:
        if self.role is not Role.SERVER:
            raise LocalProtocolError("only the server sends responses")
        if message.id is None:
            return
        if message.id not in self._in_flight:
            raise LocalProtocolError(f"no request {message.id!r} is in flight")
        self._in_flight.discard(message.id)

    def send_response(self, message: Response | ErrorResponse) -> bytes:
        """Frame one response and mark its request answered.

        Raises:
            LocalProtocolError: its id is not in flight.
            ValueError, TypeError: the result is not JSON-encodable (nothing is settled).
        """
        data = encode(message.to_json())  # may raise: then the id stays in flight
        self._settle(message)
        return data

    def send_batch(self, messages: Iterable[Response | ErrorResponse]) -> bytes:
        """Frame the responses of a batch as one JSON array line.

        Returns ``b""`` when the batch held only notifications (nothing is sent).
        """
        items = list(messages)
        data = encode([message.to_json() for message in items]) if items else b""
        for message in items:
            self._settle(message)
        return data

    def send_notification(self, method: str, params: dict[str, Any] | None = None) -> bytes:
        """Frame a notification (either role may send one)."""
        return encode(Notification(method, params).to_json())

    def send_request(
        self, method: str, params: dict[str, Any] | list[Any] | None = None
    ) -> tuple[int, bytes]:
        """(Client) frame a request with a fresh id; returns ``(id, bytes)``."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client sends requests")
        request_id = next(self._ids)
        self._in_flight.add(request_id)
        return request_id, encode(Request(request_id, method, params).to_json())
