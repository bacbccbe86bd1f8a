"""Blocking transport of VMM protocol frames over a Unix stream socket.

Sends are serialised by a lock (any thread may send); one reader receives,
either blocking (:meth:`Channel.receive`, a thread) or without blocking
(:meth:`Channel.poll`, for a reader that waits for readability itself, such
as a trio task). File descriptors ride with a frame's bytes (SCM_RIGHTS) and
are handed out with the message whose ``fds`` key counts them.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from typing import Final

from .protocol import FrameDecoder, Message, ProtocolError, encode

__all__ = ["Channel", "ChannelClosed"]

_RECV_BYTES: Final = 1 << 20
_MAX_FDS: Final = 64


class ChannelClosed(Exception):
    """The peer closed the socket (or it was closed here)."""


class Channel:
    """One end of a VMM protocol connection (owns ``sock``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()
        self._decoder = FrameDecoder()
        self._fds: list[int] = []
        self._closed = False
        self._close_lock = threading.Lock()

    def send(self, message: Message, fds: Sequence[int] = ()) -> None:
        """Send one message with ``fds`` attached (``fds`` count added to it).

        Raises:
            ChannelClosed: the peer is gone.
        """
        if fds:
            message = {**message, "fds": len(fds)}
        frame = encode(message)
        with self._send_lock:
            try:
                if fds:
                    ancillary = [
                        (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
                    ]
                    sent = self.sock.sendmsg([frame], ancillary)
                    if sent < len(frame):
                        self.sock.sendall(frame[sent:])
                else:
                    self.sock.sendall(frame)
            except OSError as error:
                raise ChannelClosed(str(error)) from error

    def receive(self) -> tuple[Message, list[int]]:
        """Block for the next message and the fds it carries (the caller owns them).

        Raises:
            ChannelClosed: end of stream.
            ProtocolError: the peer broke the protocol.
        """
        got = self._next(0)
        assert got is not None  # a blocking read returns data or raises
        return got

    def poll(self) -> tuple[Message, list[int]] | None:
        """The next message if one is buffered or readable now, else None (never blocks).

        Raises:
            ChannelClosed: end of stream.
            ProtocolError: the peer broke the protocol.
        """
        return self._next(socket.MSG_DONTWAIT)

    def take_buffered(self) -> tuple[Message, list[int]] | None:
        """The next message already read from the socket, else None (no read at all).

        Raises:
            ProtocolError: the peer broke the protocol.
        """
        return self._take()

    def _next(self, flags: int) -> tuple[Message, list[int]] | None:
        """The next message, reading with ``flags`` as needed; None: nothing to read now."""
        while True:
            got = self._take()
            if got is not None:
                return got
            if not self._fill(flags):
                return None

    def _take(self) -> tuple[Message, list[int]] | None:
        message = self._decoder.next()
        if message is None:
            return None
        count = message.get("fds", 0)
        if not isinstance(count, int) or count < 0 or count > len(self._fds):
            raise ProtocolError(f"message announces {count!r} fds, {len(self._fds)} came")
        taken, self._fds = self._fds[:count], self._fds[count:]
        return message, taken

    def _fill(self, flags: int) -> bool:
        """Read once into the decoder; False when ``MSG_DONTWAIT`` found nothing."""
        try:
            data, ancdata, _flags, _addr = self.sock.recvmsg(
                _RECV_BYTES, socket.CMSG_SPACE(_MAX_FDS * 4), flags
            )
        except BlockingIOError:
            return False
        except OSError as error:
            raise ChannelClosed(str(error)) from error
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % 4])
                for fd in fds:
                    os.set_inheritable(fd, False)
                self._fds.extend(fds)
        if not data:
            raise ChannelClosed("end of stream")
        self._decoder.feed(data)
        return True

    def shutdown(self) -> None:
        """Shut the socket down without closing it: a waiting reader sees the end of stream."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Close the socket and any fds received but not handed out (idempotent, any thread)."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []
