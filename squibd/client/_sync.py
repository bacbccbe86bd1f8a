"""The blocking client: one Unix socket, one call at a time."""

from __future__ import annotations

import contextlib
import itertools
import socket
from types import TracebackType
from typing import Any, Final

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

__all__ = ["Client"]

_RECEIVE: Final = 64 * 1024


class Client(TypedMethods[Any]):
    """A blocking squibd client.

    ::

        with Client() as squibd:
            squibd.snapshot_create("vm1", "/var/lib/squibd/a.snap", "/var/lib/squibd/a.mem")

    Ctrl-C (``KeyboardInterrupt``) during a call sends ``$/cancelRequest`` and
    waits for the daemon to roll back; the call then raises :class:`SquibdError`
    with ``cancelled`` true. A second Ctrl-C stops waiting.

    Args:
        socket_path: the daemon's socket (default: ``$SQUIBD_SOCKET``, else the daemon's).
        timeout: seconds to wait for any single read (``None``: no limit).
    """

    def __init__(self, socket_path: str | None = None, *, timeout: float | None = None) -> None:
        self.socket_path = socket_path or default_socket_path()
        self._sock: socket.socket | None = None
        self._timeout = timeout
        self._ids = itertools.count(1)
        self._buffer = b""

    def connect(self) -> Client:
        """Connect now (calls connect on first use anyway)."""
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            sock.settimeout(self._timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise DaemonUnreachable(
                    f"cannot connect to squibd at {self.socket_path}: {exc.strerror or exc}"
                ) from exc
            self._sock = sock
        return self

    def close(self) -> None:
        """Close the connection (a later call reconnects)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buffer = b""

    def __enter__(self) -> Client:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.close()

    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise DaemonUnreachable(f"squibd at {self.socket_path}: {exc}") from exc

    def _line(self) -> bytes:
        assert self._sock is not None
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(_RECEIVE)
            except OSError as exc:
                self.close()
                raise DaemonUnreachable(f"squibd at {self.socket_path}: {exc}") from exc
            if not chunk:
                self.close()
                raise DaemonUnreachable(
                    f"squibd at {self.socket_path} closed the connection before answering"
                )
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _wait(self, request_id: int, token: str | None, on_progress: ProgressCallback | None,
              method: str) -> Any:  # fmt: skip
        while True:
            for message in messages(self._line()):
                if message.get("method") == PROGRESS and on_progress is not None:
                    args = progress_args(message.get("params"))
                    if args is not None and args[0] == token:
                        on_progress(*args[1:])
                    continue
                if message.get("id") is None and "error" in message:
                    # The daemon could not read our request (one call at a time: it is ours).
                    raise SquibdError.from_json(message["error"], method)
                if message.get("id") != request_id:
                    continue
                if "error" in message:
                    raise SquibdError.from_json(message["error"], method)
                return message.get("result")

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        on_progress: ProgressCallback | None = None,
    ) -> Any:
        """Call ``method`` with ``params`` and return its result.

        Raises:
            SquibdError: the daemon answered an error.
            DaemonUnreachable: no daemon, or the connection broke.
        """
        self.connect()
        params = dict(params or {})
        request_id = next(self._ids)
        token = None
        if on_progress is not None:
            token = f"c{request_id}"
            params["progress_token"] = token
        self._send(request(request_id, method, params))
        try:
            return self._wait(request_id, token, on_progress, method)
        except KeyboardInterrupt:
            if self._sock is None:
                raise
            self._send(notification(CANCEL_REQUEST, {"id": request_id}))
            try:
                return self._wait(request_id, token, on_progress, method)
            except KeyboardInterrupt:
                with contextlib.suppress(OSError):
                    self.close()
                raise

    def _invoke(
        self, method: str, params: dict[str, Any], on_progress: ProgressCallback | None = None
    ) -> Any:
        return self.call(method, params, on_progress=on_progress)
