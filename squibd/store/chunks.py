"""Content-addressed chunks: address, encoding, verification and the local chunk cache.

A chunk is the guest-memory bytes of one manifest chunk (at most 2 MiB, never
crossing a 2 MiB boundary of the memory file). Its address is the BLAKE3
digest of those bytes (hex): BLAKE3 hashed a 2 MiB chunk at about 1.6 GB/s
here against 0.6 GB/s for hashlib's SHA-256. Stored form: one header byte
(``0x01`` zstd, ``0x00`` raw: incompressible data is kept raw) and the payload.
Every decoded chunk is checked against its address before anyone uses it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Final

import blake3
import numpy as np
import zstandard

__all__ = [
    "ADDRESS_ALGORITHM",
    "ChunkCache",
    "address_of",
    "chunk_key",
    "decode_chunk",
    "encode_chunk",
    "encode_framed",
    "is_zero",
]

ADDRESS_ALGORITHM: Final = "blake3"
_RAW: Final = b"\x00"
_ZSTD: Final = b"\x01"
#: zstd level 1: fast; random (incompressible) pages are stored raw anyway.
_LEVEL: Final = 1
_SAMPLE: Final = 64 * 1024


def address_of(data: bytes | memoryview) -> str:
    """The chunk's address: BLAKE3 of its bytes, hex."""
    return blake3.blake3(data).hexdigest()


def chunk_key(address: str) -> str:
    """Object key of a chunk in the store."""
    return f"chunks/{address[:2]}/{address}"


def is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether every byte is zero (such chunks are not stored).

    numpy scans 8 bytes at a time (a memoryview compared with bytes goes byte by
    byte: 27 ms for a zero 2 MiB chunk here against well under 1 ms).
    """
    view = memoryview(data).cast("B")
    if not len(view):
        return True
    if view[0] or view[-1]:
        return False
    words = len(view) // 8
    head = np.frombuffer(view, dtype=np.uint64, count=words)
    return not head.any() and not any(view[words * 8:])


def encode_chunk(data: bytes | memoryview) -> bytes:
    """Stored form of a chunk: zstd when that saves at least 1/16, else raw.

    A 64 KiB sample is tried first: random (incompressible) memory then costs
    a few percent of a full compression attempt.
    """
    compressor = zstandard.ZstdCompressor(level=_LEVEL)
    if len(data) > 2 * _SAMPLE:
        sample = len(compressor.compress(data[:_SAMPLE]))
        if sample >= _SAMPLE - _SAMPLE // 16:
            return _RAW + bytes(data)
    packed = compressor.compress(data)
    if len(packed) < len(data) - len(data) // 16:
        return _ZSTD + packed
    return _RAW + bytes(data)


def encode_framed(framed: bytearray) -> bytearray | bytes:
    """Like :func:`encode_chunk` for a buffer whose first byte is free for the header.

    A raw chunk is the buffer itself (no copy of 2 MiB).
    """
    data = memoryview(framed)[1:]
    compressor = zstandard.ZstdCompressor(level=_LEVEL)
    if len(data) > 2 * _SAMPLE:
        sample = len(compressor.compress(data[:_SAMPLE]))
        if sample >= _SAMPLE - _SAMPLE // 16:
            framed[0] = _RAW[0]
            return framed
    packed = compressor.compress(data)
    if len(packed) < len(data) - len(data) // 16:
        return _ZSTD + packed
    framed[0] = _RAW[0]
    return framed


def decode_chunk(stored: bytes | memoryview, length: int) -> bytes | memoryview | None:
    """The chunk's bytes from its stored form; None when it cannot be decoded to ``length``."""
    if not len(stored):
        return None
    view = memoryview(stored)
    kind, payload = bytes(view[:1]), view[1:]
    data: bytes | memoryview
    if kind == _RAW:
        data = payload
    elif kind == _ZSTD:
        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=length)
        except zstandard.ZstdError:
            return None
    else:
        return None
    return data if len(data) == length else None


class ChunkCache:
    """Stored-form chunks kept on local disk, by address (files written atomically).

    Entries are checked against their address on every use by the caller; a bad
    entry is dropped with :meth:`drop`. The cache is not bounded here: remove the
    directory to reclaim the space.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.join(directory, "chunks")
        os.makedirs(self.directory, exist_ok=True)

    def _path(self, address: str) -> str:
        return os.path.join(self.directory, address[:2], address)

    def get(self, address: str) -> bytes | None:
        try:
            with open(self._path(address), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, address: str, stored: bytes | memoryview) -> None:
        path = self._path(address)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(stored)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def drop(self, address: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(address))
