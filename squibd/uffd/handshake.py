"""The page-server handshake, compatible with Firecracker's.

Theory of operation: the VMM connects to the page server's Unix stream
socket and sends ONE message: the UTF-8 JSON array of its guest memory
regions, each ``{"base_host_virt_addr", "size", "offset", "page_size",
"page_size_kib"}`` (``offset`` is cumulative in memory-file order;
``page_size_kib`` carries the page size in *bytes*, as Firecracker does for
compatibility with older page servers), with the userfaultfd attached as
``SCM_RIGHTS``. Firecracker sends nothing else and never reads.

squibd extension (ignored by Firecracker): the page server may write one
JSON line back, ``{"ready": true, "pair_id": ...}`` once it has taken the
handshake (``pair_id`` names the newest snapshot of the chain it serves, so
the VMM can refuse a server serving another snapshot), or
``{"error": "..."}`` right before it gives up serving (for example on a
corrupt chunk). The squibd VMM side reads it to report why the VM stopped.
"""

from __future__ import annotations

import array
import json
import os
import socket
from collections.abc import Sequence
from typing import Any, Final

import attrs

from .errors import HandshakeInvalid

__all__ = [
    "MAX_HANDSHAKE_BYTES",
    "MAX_SOCKET_PATH_BYTES",
    "RegionMapping",
    "decode_regions",
    "encode_regions",
    "encode_status",
    "receive_handshake",
    "send_handshake",
]

#: sun_path is 108 bytes including the terminating NUL (linux/un.h).
MAX_SOCKET_PATH_BYTES: Final = 107
#: Cap on the JSON we accept: thousands of regions fit; anything larger is not a VMM.
MAX_HANDSHAKE_BYTES: Final = 1 << 20
_INT_SIZE: Final = array.array("i").itemsize


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


def encode_regions(regions: Sequence[RegionMapping]) -> bytes:
    """The handshake body for ``regions``."""
    return json.dumps([r.to_json() for r in regions], separators=(",", ":")).encode()


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
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
    return tuple(regions)


def send_handshake(sock: socket.socket, regions: Sequence[RegionMapping], uffd: int) -> None:
    """Send the one handshake message with ``uffd`` attached (SCM_RIGHTS).

    Raises:
        OSError: the peer closed or the send failed.
    """
    body = encode_regions(regions)
    fds = array.array("i", [uffd])
    sent = sock.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
    if sent < len(body):
        sock.sendall(body[sent:])


def receive_handshake(sock: socket.socket) -> tuple[tuple[RegionMapping, ...], int]:
    """Receive the handshake: the regions and the userfaultfd (owned by the caller).

    Reads until the JSON is complete (a stream may split the message).

    Raises:
        HandshakeInvalid: EOF before a complete message, no fd, or bad JSON.
    """
    body = b""
    fd: int | None = None
    while True:
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
        if not data:
            break
        try:
            json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            if len(body) > MAX_HANDSHAKE_BYTES:
                break
            continue
        break
    try:
        if fd is None:
            raise HandshakeInvalid("the handshake carried no file descriptor (SCM_RIGHTS)")
        if not body:
            raise HandshakeInvalid("the VMM closed the socket before sending the handshake")
        return decode_regions(body), fd
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise


def encode_status(
    *, ready: bool = False, error: str | None = None, pair_id: str | None = None
) -> bytes:
    """One status line from the page server to a squibd VMM (see the module docs)."""
    message: dict[str, object] = {"error": error} if error is not None else {"ready": ready}
    if pair_id is not None and error is None:
        message["pair_id"] = pair_id
    return json.dumps(message).encode() + b"\n"
