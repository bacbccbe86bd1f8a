"""The page-server handshake, compatible with Firecracker's.

Theory of operation: the VMM connects to the page server's Unix stream
socket and sends ONE message: the UTF-8 JSON array of its guest memory
regions, each ``{"base_host_virt_addr", "size", "offset", "page_size",
"page_size_kib"}`` (``offset`` is cumulative in memory-file order;
``page_size_kib`` carries the page size in *bytes*, as Firecracker does for
compatibility with older page servers), with the userfaultfd attached as
``SCM_RIGHTS``. Firecracker sends nothing else and never reads; v1.7 to v1.11
close their end of the socket right after the handshake.

squibd extension: a VMM that wants status lines sets ``"squibd_status": 1``
in every region (Firecracker-style servers ignore unknown fields). A squibd
page server then writes JSON lines back:

1. ``{"page_server": "squibd"}`` (the *hello*) while the handshake is still
   unread in its socket (it peeks at it first), so once the VMM sees its
   handshake consumed (``SIOCOUTQ`` = 0) the hello is already queued: the VMM
   knows at once, without a timeout, whether the server will answer (this
   holds while the handshake is one socket buffer, i.e. below about 200
   regions; a longer one is answered after it is read, and the VMM may then
   take the server for a silent one: it only loses the early error report);
2. ``{"ready": true, "pair_id": ...}`` once it has taken the handshake and
   prefetched (``pair_id`` names the newest snapshot served, so the VMM can
   refuse a server serving another snapshot), or ``{"error": "..."}`` right
   before it gives up serving (for example on a corrupt chunk).

A VMM that asked for status keeps the socket open while it runs: its end
closing means the VM is gone. A VMM that did not ask may close the socket at
any time; the page server then watches the VMM's process instead.
"""

from __future__ import annotations

import array
import json
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Final

import attrs

from .errors import HandshakeInvalid

__all__ = [
    "HELLO",
    "MAX_HANDSHAKE_BYTES",
    "MAX_SOCKET_PATH_BYTES",
    "STATUS_FIELD",
    "Handshake",
    "RegionMapping",
    "decode_handshake",
    "decode_regions",
    "encode_regions",
    "encode_status",
    "receive_handshake",
    "send_handshake",
    "send_status",
]

#: sun_path is 108 bytes including the terminating NUL (linux/un.h).
MAX_SOCKET_PATH_BYTES: Final = 107
#: Cap on the JSON we accept: thousands of regions fit; anything larger is not a VMM.
MAX_HANDSHAKE_BYTES: Final = 1 << 20
_INT_SIZE: Final = array.array("i").itemsize
#: The region field by which a VMM asks for status lines (a squibd extension).
STATUS_FIELD: Final = "squibd_status"
#: The hello line of a squibd page server (see the module docs).
HELLO: Final = b'{"page_server": "squibd"}\n'


@attrs.frozen
class RegionMapping:
    """One guest memory region as the VMM mapped it (Firecracker's GuestRegionUffdMapping)."""

    base_host_virt_addr: int
    size: int
    offset: int
    page_size: int

    def to_json(self) -> dict[str, int]:
        """The wire form: all five fields, ``page_size_kib`` equal to ``page_size`` (bytes)."""
        return {
            "base_host_virt_addr": self.base_host_virt_addr,
            "size": self.size,
            "offset": self.offset,
            "page_size": self.page_size,
            "page_size_kib": self.page_size,
        }


def encode_regions(regions: Sequence[RegionMapping], *, want_status: bool = False) -> bytes:
    """The handshake body for ``regions`` (with the status request when ``want_status``)."""
    entries: list[dict[str, int]] = [r.to_json() for r in regions]
    if want_status:
        for entry in entries:
            entry[STATUS_FIELD] = 1
    return json.dumps(entries, separators=(",", ":")).encode()


@attrs.frozen
class Handshake:
    """A received handshake: the regions, the userfaultfd and whether status was asked."""

    regions: tuple[RegionMapping, ...]
    uffd: int
    wants_status: bool


def _as_uint(entry: dict[str, Any], name: str, index: int) -> int:
    value = entry.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HandshakeInvalid(f"region {index}: {name!r} must be a non-negative integer")
    return value


def decode_regions(body: bytes) -> tuple[RegionMapping, ...]:
    """Parse the handshake body; accepts ``page_size`` or only the older ``page_size_kib``.

    Raises:
        HandshakeInvalid: not a JSON array of well-formed region objects.
    """
    return decode_handshake(body)[0]


def _wants_status(data: object) -> bool:
    return (
        isinstance(data, list)
        and bool(data)
        and isinstance(data[0], dict)
        and data[0].get(STATUS_FIELD) == 1
    )


def decode_handshake(body: bytes) -> tuple[tuple[RegionMapping, ...], bool]:
    """Parse the handshake body: (regions, whether the VMM asked for status lines).

    Raises:
        HandshakeInvalid: not a JSON array of well-formed region objects.
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise HandshakeInvalid(f"the handshake is not JSON: {exc}") from exc
    if not isinstance(data, list) or not data:
        raise HandshakeInvalid("the handshake must be a non-empty JSON array of regions")
    regions = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise HandshakeInvalid(f"region {index} is not a JSON object")
        page_size_name = "page_size" if "page_size" in entry else "page_size_kib"
        page_size = _as_uint(entry, page_size_name, index)
        if page_size == 0 or page_size & (page_size - 1):
            raise HandshakeInvalid(f"region {index}: page size {page_size} is not a power of two")
        regions.append(
            RegionMapping(
                base_host_virt_addr=_as_uint(entry, "base_host_virt_addr", index),
                size=_as_uint(entry, "size", index),
                offset=_as_uint(entry, "offset", index),
                page_size=page_size,
            )
        )
    return tuple(regions), _wants_status(data)


def send_handshake(
    sock: socket.socket, regions: Sequence[RegionMapping], uffd: int, *, want_status: bool = False
) -> None:
    """Send the one handshake message with ``uffd`` attached (SCM_RIGHTS).

    Honours the socket's timeout.

    Raises:
        OSError: the peer closed or the send failed (TimeoutError: no room in time).
    """
    body = encode_regions(regions, want_status=want_status)
    fds = array.array("i", [uffd])
    sent = sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent < len(body):
        sock.sendall(body[sent:])


def _parses(body: bytes) -> bool:
    try:
        json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return True


def _peek_for_status(sock: socket.socket) -> bool:
    """Peek at the queued handshake (fds stay queued); True when it asks for status."""
    data = sock.recv(MAX_HANDSHAKE_BYTES, socket.MSG_PEEK)
    if not _parses(data):
        return False  # not all there yet (or not JSON): decided after the real read
    try:
        return _wants_status(json.loads(data))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False


def receive_handshake(sock: socket.socket, *, timeout: float | None = None) -> Handshake:
    """Receive the handshake: the regions and the userfaultfd (owned by the caller).

    Reads until the JSON is complete (a stream may split the message). When the
    VMM asks for status lines, the hello is sent before the handshake leaves the
    socket's queue (see the module docs). ``timeout`` bounds the whole exchange.

    Raises:
        HandshakeInvalid: EOF or ``timeout`` before a complete message, no fd, or bad JSON.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    hello_sent = False
    body = b""
    fd: int | None = None
    try:
        _set_remaining(sock, deadline)
        if _peek_for_status(sock):
            send_status(sock, HELLO)
            hello_sent = True
        while True:
            _set_remaining(sock, deadline)
            data, ancdata, _flags, _addr = sock.recvmsg(
                MAX_HANDSHAKE_BYTES, socket.CMSG_SPACE(4 * _INT_SIZE)
            )
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % _INT_SIZE])
                    for extra in received[1:] if fd is None else received:
                        os.close(extra)
                    if fd is None and received:
                        fd = received[0]
            body += data
            if not data or _parses(body) or len(body) > MAX_HANDSHAKE_BYTES:
                break
        if fd is None:
            raise HandshakeInvalid("the handshake carried no file descriptor (SCM_RIGHTS)")
        if not body:
            raise HandshakeInvalid("the VMM closed the socket before sending the handshake")
        regions, wants_status = decode_handshake(body)
        if wants_status and not hello_sent:
            send_status(sock, HELLO)
        return Handshake(regions, fd, wants_status)
    except TimeoutError as exc:
        if fd is not None:
            os.close(fd)
        raise HandshakeInvalid(
            f"no complete handshake within {timeout:g} s; the VMM sent {len(body)} bytes"
        ) from exc
    except OSError as exc:
        if fd is not None:
            os.close(fd)
        raise HandshakeInvalid(f"receiving the handshake failed: {exc.strerror or exc}") from exc
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def _set_remaining(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)


def send_status(sock: socket.socket, line: bytes) -> bool:
    """Queue one status line without ever blocking on the VMM; False when it could not."""
    try:
        return sock.send(line, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL) == len(line)
    except OSError:
        return False  # a VMM that is gone or does not read needs no news


def encode_status(
    *, ready: bool = False, error: str | None = None, pair_id: str | None = None
) -> bytes:
    """One status line from the page server to a squibd VMM (see the module docs)."""
    message: dict[str, object] = {"error": error} if error is not None else {"ready": ready}
    if pair_id is not None and error is None:
        message["pair_id"] = pair_id
    return json.dumps(message).encode() + b"\n"
