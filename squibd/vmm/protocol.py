"""The VMM protocol codec (sans-IO); the normative text is ``protocol/vmm.md``.

A frame is a 4-byte little-endian length followed by that many bytes of one
MessagePack map. File descriptors travel beside the bytes (SCM_RIGHTS on
the frame's first byte); a message that carries fds says how many in its
``fds`` key, so that a receiver can pair them with the message.

Three kinds of message, all carrying ``v`` (the protocol version):

- request: ``{"v", "id", "op", ...}`` (``id`` a positive integer);
- reply: ``{"v", "id", "ok": true, "result": {...}}`` or
  ``{"v", "id", "ok": false, "error": {"type", "message"}}``;
- event: ``{"v", "event", ...}`` (no ``id``; from the VM process only).

This module only turns messages into bytes and bytes into messages; it
never touches a socket.
"""

from __future__ import annotations

import struct
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_FRAME",
    "REVISION",
    "VERSION",
    "FrameDecoder",
    "ProtocolError",
    "encode",
    "error_reply",
    "ok_reply",
    "pack_dirty_words",
    "request",
    "unpack_dirty_words",
]

#: The protocol version this module speaks (``protocol/vmm.md``).
VERSION: Final = 1
#: The optional additions to version 1 this implementation offers
#: (``protocol/vmm.md``, "Revisions"); a peer that reports none offers revision 0.
REVISION: Final = 2
#: Largest frame accepted (a dirty bitmap of 1 TiB of 4 KiB pages is 32 MiB).
MAX_FRAME: Final = 64 * 1024 * 1024
_LEN: Final = struct.Struct("<I")

Message = dict[str, Any]


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid frame of this protocol version."""


def encode(message: Message) -> bytes:
    """One frame holding ``message`` (``v`` is added when missing).

    Raises:
        ProtocolError: the message does not fit in one frame.
    """
    body: bytes = msgpack.packb({"v": VERSION, **message}, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LEN.pack(len(body)) + body


def request(request_id: int, op: str, **params: Any) -> Message:
    """A request message."""
    return {"id": request_id, "op": op, **params}


def ok_reply(request_id: int, result: Message | None = None) -> Message:
    """A successful reply to request ``request_id``."""
    return {"id": request_id, "ok": True, "result": result or {}}


def error_reply(request_id: int, error_type: str, message: str) -> Message:
    """A failed reply: ``error_type`` names the failure (``protocol/vmm.md``)."""
    return {"id": request_id, "ok": False, "error": {"type": error_type, "message": message}}


class FrameDecoder:
    """Turns a byte stream into messages: :meth:`feed` bytes, then :meth:`next`."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        """Append received bytes."""
        self._buffer += data

    def next(self) -> Message | None:
        """The next complete message, or None when more bytes are needed.

        Raises:
            ProtocolError: oversized frame, not a MessagePack map, or another version.
        """
        if len(self._buffer) < _LEN.size:
            return None
        (length,) = _LEN.unpack_from(self._buffer)
        if length > MAX_FRAME:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
        end = _LEN.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[_LEN.size : end])
        del self._buffer[:end]
        try:
            message = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as error:
            raise ProtocolError(f"frame is not MessagePack: {error}") from error
        if not isinstance(message, dict):
            raise ProtocolError("frame is not a map")
        if message.get("v") != VERSION:
            raise ProtocolError(f"protocol version {message.get('v')!r}, expected {VERSION}")
        return message

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole frame."""
        return len(self._buffer)


def pack_dirty_words(words: npt.NDArray[np.uint64]) -> list[Any]:
    """One region's dirty bitmap in the ``dirty`` form (revision 1, ``protocol/vmm.md``).

    ``[word_count, indices, values]``: ``indices`` little-endian u32 word
    indices and ``values`` the little-endian u64 words there, the others
    zero; or ``indices`` nil and ``values`` every word (denser bitmaps).
    """
    count = len(words)
    at = np.flatnonzero(words)
    if len(at) * 12 >= count * 8:
        return [count, None, np.asarray(words, dtype="<u8").tobytes()]
    return [count, at.astype("<u4").tobytes(), np.asarray(words[at], dtype="<u8").tobytes()]


def unpack_dirty_words(item: Any) -> npt.NDArray[np.uint64]:
    """The bitmap of one :func:`pack_dirty_words` item.

    Raises:
        ProtocolError: malformed item.
    """
    try:
        count, at, values = item
        count = int(count)
        if at is None:
            dense = np.frombuffer(values, dtype="<u8").astype(np.uint64)
            if len(dense) != count:
                raise ValueError(f"{len(dense)} words, {count} announced")
            return dense
        indices = np.frombuffer(at, dtype="<u4")
        words = np.frombuffer(values, dtype="<u8")
        if len(indices) != len(words) or (len(indices) and int(indices.max()) >= count):
            raise ValueError("indices and values disagree")
        out = np.zeros(count, dtype=np.uint64)
        out[indices] = words
        return out
    except (TypeError, ValueError) as error:
        raise ProtocolError(f"malformed dirty words: {error}") from error
