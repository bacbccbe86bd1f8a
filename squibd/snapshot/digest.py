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

from collections.abc import Callable, Sequence
from typing import Final

import xxhash

from .manifest import DEFAULT_CHUNK_SIZE, DIGEST_SIZES, Extent, iter_chunks

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DigestFunction",
    "UnknownDigestAlgorithm",
    "available_algorithms",
    "digest",
    "digest_function",
    "manifest_digests",
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
