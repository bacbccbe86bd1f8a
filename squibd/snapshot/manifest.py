"""The memory manifest of SPEC section 4: what binds a state file to its memory file.

The memory file is raw guest memory, regions concatenated in guest-physical
order, no header. The manifest records the layout (regions), which byte runs
were written (``extents``; everything else is a hole that reads as zero), a
random ``pair_id`` (also stored in the memory file's ``user.squibd.pair``
xattr), the parent's pair id for a Diff, and digests of the written data.

Digest layout: every extent is cut at multiples of ``chunk_size`` counted
from the start of the file, giving the chunks in extent order; ``digests``
is the concatenation of each chunk's digest (``DIGEST_SIZES[algorithm]``
bytes each). ``iter_chunks`` is the one definition of that cut.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import attrs

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_SIZES",
    "KIND_DIFF",
    "KIND_FULL",
    "Extent",
    "MemoryManifest",
    "MemoryRegion",
    "iter_chunks",
]

#: SPEC section 4: digests cover chunks of at most 2 MiB.
DEFAULT_CHUNK_SIZE: Final = 2 * 1024 * 1024

KIND_FULL: Final = "Full"
KIND_DIFF: Final = "Diff"

#: Digest algorithm name -> digest length in bytes (SPEC section 4).
DIGEST_SIZES: Final[dict[str, int]] = {"xxh3-64": 8, "blake3": 32}


@attrs.frozen
class MemoryRegion:
    """One guest memory region and where it lives in the memory file."""

    guest_addr: int
    size: int
    file_offset: int


@attrs.frozen
class Extent:
    """A run of written bytes in the memory file: ``[offset, offset + length)``."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@attrs.frozen
class MemoryManifest:
    """Everything a reader needs to trust and interpret a memory file."""

    page_size: int
    regions: tuple[MemoryRegion, ...]
    kind: str  # KIND_FULL or KIND_DIFF
    file_size: int
    pair_id: str
    parent_pair_id: str | None
    extents: tuple[Extent, ...]
    digest_algorithm: str
    chunk_size: int
    digests: bytes

    @property
    def digest_size(self) -> int:
        return DIGEST_SIZES[self.digest_algorithm]

    @property
    def bytes_written(self) -> int:
        return sum(extent.length for extent in self.extents)


def iter_chunks(extents: tuple[Extent, ...] | list[Extent], chunk_size: int) -> Iterator[Extent]:
    """Cut extents at multiples of ``chunk_size`` (from file offset 0), in order."""
    for extent in extents:
        offset, end = extent.offset, extent.end
        while offset < end:
            boundary = (offset // chunk_size + 1) * chunk_size
            stop = min(end, boundary)
            yield Extent(offset, stop - offset)
            offset = stop
