"""Chunk digests of memory files (SPEC section 4).

The manifest stores one digest per chunk (see ``manifest.iter_chunks``).
Two algorithms are allowed: ``xxh3-64`` (8 bytes, big-endian canonical form
as xxhash prints it) and ``blake3`` (32 bytes, only when the ``blake3``
package is installed). squibd writes ``xxh3-64`` by default: measured in
``bench/digest.py``, it hashes tens of GB/s per core and the ``xxhash``
binding releases the GIL for large inputs, so writer threads hash in
parallel. The integrity goal is catching corruption, not an adversary.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Final

import xxhash

from .errors import MemoryIo
from .manifest import DEFAULT_CHUNK_SIZE, DIGEST_SIZES, Extent, iter_chunks

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DigestFunction",
    "UnknownDigestAlgorithm",
    "available_algorithms",
    "digest",
    "digest_function",
    "file_chunk_digests",
    "manifest_digests",
    "read_pieces",
    "unit_digest",
]

Buffer = bytes | bytearray | memoryview
#: A function from a buffer to its digest bytes.
DigestFunction = Callable[[Buffer], bytes]

#: The algorithm squibd writes (chosen by bench/digest.py).
DEFAULT_ALGORITHM: Final = "xxh3-64"
#: Every algorithm SPEC section 4 names.
ALGORITHMS: Final = tuple(DIGEST_SIZES)


class UnknownDigestAlgorithm(ValueError):
    """The digest algorithm is not one SPEC section 4 names, or its library is missing."""


#: The binding's own function (no Python wrapper frame: Diffs hash thousands of pages).
_xxh3_64: DigestFunction = xxhash.xxh3_64_digest


def _blake3_function() -> DigestFunction | None:
    try:
        import blake3  # optional dependency
    except ImportError:
        return None

    def _blake3(data: Buffer) -> bytes:
        # Single-threaded hashing (the default): writer threads parallelise across chunks.
        result: bytes = blake3.blake3(data).digest()
        return result

    return _blake3


def available_algorithms() -> tuple[str, ...]:
    """Algorithms usable in this process."""
    return tuple(name for name in ALGORITHMS if name == "xxh3-64" or _blake3_function())


def digest_function(algorithm: str) -> DigestFunction:
    """The function computing ``algorithm``'s digest of a buffer.

    Raises:
        UnknownDigestAlgorithm: the name is unknown or its library is not installed.
    """
    if algorithm == "xxh3-64":
        return _xxh3_64
    if algorithm == "blake3":
        function = _blake3_function()
        if function is None:
            raise UnknownDigestAlgorithm(
                "digest algorithm 'blake3' needs the 'blake3' package (pip install blake3)"
            )
        return function
    raise UnknownDigestAlgorithm(
        f"unknown digest algorithm {algorithm!r}; expected one of {', '.join(ALGORITHMS)}"
    )


def digest(algorithm: str, data: Buffer) -> bytes:
    """``algorithm``'s digest of ``data``."""
    return digest_function(algorithm)(data)


def manifest_digests(
    read: Callable[[int, int], Buffer],
    extents: tuple[Extent, ...] | list[Extent],
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> bytes:
    """The manifest's ``digests`` field for data that is already written.

    Args:
        read: ``read(offset, length)`` returns those bytes of the memory file.
        extents: the written extents, cut into chunks by ``iter_chunks``.

    The memory writer hashes inside its writer threads instead; this is for
    a memory file (or buffer) built by other means.
    """
    hash_chunk = digest_function(algorithm)
    return b"".join(
        hash_chunk(read(chunk.offset, chunk.length)) for chunk in iter_chunks(extents, chunk_size)
    )


def unit_digest(hash_of: DigestFunction, pieces: Sequence[Buffer], combined: bool) -> bytes:
    """The digest of one ``manifest.DigestUnit`` given its pieces' bytes, in order.

    ``combined`` False: the digest of the single piece; True: the digest of the
    concatenated digests of the pieces (the page-map form).
    """
    if not combined:
        if len(pieces) != 1:
            raise ValueError(f"a plain digest unit has one piece, got {len(pieces)}")
        return hash_of(pieces[0])
    return hash_of(b"".join(hash_of(piece) for piece in pieces))


def read_pieces(
    fd: int, buffer: memoryview, pieces: Sequence[tuple[int, int]]
) -> list[memoryview]:
    """Read the span of ``pieces`` (``(offset, length)``, ascending) with one read.

    The span (first offset to last end) must fit ``buffer``; the returned views
    into ``buffer`` are valid until the next call with it.

    Raises:
        MemoryIo: the file ends inside the span (EIO: truncated), or the read failed.
    """
    base = pieces[0][0]
    view = buffer[: pieces[-1][0] + pieces[-1][1] - base]
    done = 0
    while done < len(view):
        try:
            got = os.preadv(fd, [view[done:]], base + done)
        except OSError as error:
            raise MemoryIo(error) from error
        if got == 0:
            raise MemoryIo(errno.EIO)  # the file ended inside a written piece: truncated
        done += got
    return [view[offset - base : offset - base + length] for offset, length in pieces]


def file_chunk_digests(
    fd: int,
    extents: Iterable[Extent],
    *,
    algorithm: str = DEFAULT_ALGORITHM,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    known: Callable[[Extent], bytes | None] | None = None,
    cancel: threading.Event | None = None,
    cancelled: Callable[[], BaseException] | None = None,
) -> bytes:
    """The manifest's ``digests`` field, read back from the memory file ``fd``.

    The one "read a chunk back and hash it" loop (rebase, and the live save's
    final pass, which can call it from ``vm/live.py``). Chunks are
    ``iter_chunks(extents, chunk_size)``; the chunks of one chunk-size window
    are read with a single ``pread``.

    Args:
        known: ``known(chunk)`` returns a digest already computed for that chunk
            (it is not read), or None to read and hash it.
        cancel: checked before each window; when set, the exception
            ``cancelled()`` returns is raised (default: ``MemoryIo(ECANCELED)``).

    Raises:
        MemoryIo: a read failed or the file is shorter than the extents.
    """
    hash_of = digest_function(algorithm)
    out: list[bytes] = []
    buffer = memoryview(bytearray(chunk_size))
    group: list[Extent] = []  # chunks of one window, to read, in order
    slots: list[int] = []  # their index in ``out``

    def flush() -> None:
        if cancel is not None and cancel.is_set():
            raise cancelled() if cancelled is not None else MemoryIo(errno.ECANCELED)
        if group:
            views = read_pieces(fd, buffer, [(c.offset, c.length) for c in group])
            for slot, view in zip(slots, views, strict=True):
                out[slot] = hash_of(view)
            group.clear()
            slots.clear()

    try:
        window = -1
        for chunk in iter_chunks(tuple(extents), chunk_size):
            if chunk.offset // chunk_size != window:
                flush()
                window = chunk.offset // chunk_size
            have = known(chunk) if known is not None else None
            out.append(have if have is not None else b"")
            if have is None:
                group.append(chunk)
                slots.append(len(out) - 1)
        flush()
    finally:
        buffer.release()
    return b"".join(out)
