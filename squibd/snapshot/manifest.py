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

Compact form (state format 1.1.0). A manifest whose written data is
scattered (a guest that dirtied every other page of 32 GiB has 4 million
extents) would not fit the state-file size limit as a list of extents with
one digest per piece. Such a manifest stores ``page_map`` instead:

- ``page_map``: zlib-compressed bitmap, one bit per page of the file
  (``file_size // page_size`` bits, least significant bit first, padding bits
  zero), set where the page was written; the wire ``extents`` list is empty.
  ``MemoryManifest.extents`` decodes it into the same extents a writer
  reports: maximal runs of written pages, cut at region starts.
- ``digests``: one digest per *window* (``chunk_size`` bytes aligned in the
  file) holding a written page, in file order. A window's digest is the
  digest of the concatenated digests of its pieces, where the pieces are the
  extents cut at window boundaries (``iter_chunks``). It is computed from
  per-piece digests, so a writer never re-reads data to produce it.

``iter_digest_units`` hides the difference: it yields, for either form, the
pieces that one stored digest covers and whether that digest is combined.
Worst case: every other 4 KiB page of a 256 GiB guest gives a bitmap of
8 MiB raw (random patterns do not compress) plus 1 MiB of window digests.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DIGEST_SIZES",
    "KIND_DIFF",
    "KIND_FULL",
    "MAX_PAGE_MAP_BYTES",
    "PAGE_MAP_MIN_EXTENTS",
    "DigestUnit",
    "Extent",
    "MemoryManifest",
    "MemoryRegion",
    "PageMapError",
    "compact_manifest",
    "decode_page_map",
    "encode_page_map",
    "iter_chunks",
    "iter_digest_units",
    "page_map_runs",
    "page_map_windows",
    "split_at_boundaries",
]

#: SPEC section 4: digests cover chunks of at most 2 MiB.
DEFAULT_CHUNK_SIZE: Final = 2 * 1024 * 1024

KIND_FULL: Final = "Full"
KIND_DIFF: Final = "Diff"

#: Digest algorithm name -> digest length in bytes (SPEC section 4).
DIGEST_SIZES: Final[dict[str, int]] = {"xxh3-64": 8, "blake3": 32}
#: ``encode_state`` stores a manifest with more extents than this as a page map
#: (below it the extent list costs at most a few hundred KB and every reader
#: of the 1.0.0 form keeps working unchanged).
PAGE_MAP_MIN_EXTENTS: Final = 16384

#: Largest raw page bitmap (10 MB: 80 million pages, 320 GiB of 4 KiB pages). A
#: state file cannot hold more incompressible bits, and the cap bounds what a
#: hostile, highly compressed map can make a reader allocate.
MAX_PAGE_MAP_BYTES: Final = 10_000_000

Array = npt.NDArray[np.int64]


class PageMapError(ValueError):
    """A page map that does not decode to a bitmap of the file's pages."""


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
    """Everything a reader needs to trust and interpret a memory file.

    ``extents`` is the list of written extents in either form (see the module
    doc); construct with ``extents=...`` (the 1.0.0 form) or with
    ``extents=()`` and ``page_map=...`` (the compact form).
    """

    page_size: int
    regions: tuple[MemoryRegion, ...]
    kind: str  # KIND_FULL or KIND_DIFF
    file_size: int
    pair_id: str
    parent_pair_id: str | None
    _extents: tuple[Extent, ...] = attrs.field(alias="extents")
    digest_algorithm: str
    chunk_size: int
    digests: bytes
    #: State format 1.1.0: the written pages as a compressed bitmap (module doc).
    page_map: bytes | None = None

    @property
    def extents(self) -> tuple[Extent, ...]:
        """The written extents, in file order (decoded from ``page_map`` if present).

        Raises:
            PageMapError: the page map does not decode (``check_compatible`` says so first).
        """
        if self.page_map is None:
            return self._extents
        starts, lengths = page_map_runs(self, windows=False)
        return tuple(
            Extent(s, n) for s, n in zip(starts.tolist(), lengths.tolist(), strict=True)
        )

    @property
    def stored_extents(self) -> tuple[Extent, ...]:
        """The extent list as stored (empty in the compact form)."""
        return self._extents

    @property
    def digest_size(self) -> int:
        return DIGEST_SIZES[self.digest_algorithm]

    @property
    def bytes_written(self) -> int:
        if self.page_map is not None:
            return int(decode_page_map(self).sum()) * self.page_size
        return sum(extent.length for extent in self._extents)


@attrs.frozen
class DigestUnit:
    """One stored digest and the pieces ``(offset, length)`` of the file it covers.

    ``combined`` False: the digest is of the single piece's bytes (1.0.0 form);
    True: it is the digest of the concatenated digests of the pieces (page map).
    """

    pieces: tuple[tuple[int, int], ...]
    digest: bytes
    combined: bool

    @property
    def offset(self) -> int:
        return self.pieces[0][0]

    @property
    def end(self) -> int:
        return self.pieces[-1][0] + self.pieces[-1][1]


def split_at_boundaries(extents: Sequence[Extent], boundaries: Sequence[int]) -> tuple[Extent, ...]:
    """Cut ``extents`` at the file offsets in ``boundaries`` (sorted; the regions' starts).

    A manifest's extents never span two regions, as the memory writer reports
    them, so that a manifest with very many extents can be stored as a page map.
    """
    out: list[Extent] = []
    for extent in extents:
        start = extent.offset
        for boundary in boundaries:
            if start < boundary < extent.end:
                out.append(Extent(start, boundary - start))
                start = boundary
        out.append(Extent(start, extent.end - start))
    return tuple(out)


def iter_chunks(extents: tuple[Extent, ...] | list[Extent], chunk_size: int) -> Iterator[Extent]:
    """Cut extents at multiples of ``chunk_size`` (from file offset 0), in order."""
    for extent in extents:
        offset, end = extent.offset, extent.end
        while offset < end:
            boundary = (offset // chunk_size + 1) * chunk_size
            stop = min(end, boundary)
            yield Extent(offset, stop - offset)
            offset = stop


def decode_page_map(manifest: MemoryManifest) -> npt.NDArray[np.bool_]:
    """The written-page bitmap of a compact manifest, one bool per page of the file.

    Raises:
        PageMapError: not a manifest with a page map, a bad page size, a map that
            does not decompress to exactly the file's pages, or set padding bits.
    """
    if manifest.page_map is None:
        raise PageMapError("the manifest has no page map")
    page = manifest.page_size
    if page <= 0 or manifest.file_size < 0 or manifest.file_size % page:
        raise PageMapError(f"file size {manifest.file_size} is not a multiple of page {page}")
    pages = manifest.file_size // page
    expected = (pages + 7) // 8
    if expected > MAX_PAGE_MAP_BYTES:
        raise PageMapError(
            f"{pages} pages need a {expected}-byte bitmap, more than {MAX_PAGE_MAP_BYTES}"
        )
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(manifest.page_map, expected + 1)
    except zlib.error as error:
        raise PageMapError(f"page map does not decompress: {error}") from error
    if len(raw) != expected or not inflater.eof or inflater.unused_data:
        raise PageMapError(
            f"page map does not decompress to the {expected} bytes of {pages} pages"
        )
    bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
    if bits[pages:].any():
        raise PageMapError("page map sets bits beyond the last page")
    return bits[:pages].astype(bool)


def encode_page_map(written: npt.NDArray[np.bool_]) -> bytes:
    """The ``page_map`` field for a bitmap of written pages (one bool per page)."""
    packed = np.packbits(np.asarray(written, dtype=bool), bitorder="little")
    return zlib.compress(packed.tobytes(), 6)


def _runs(written: npt.NDArray[np.bool_], cuts: npt.NDArray[np.bool_]) -> tuple[Array, Array]:
    """Maximal runs of set pages, also cut where ``cuts`` is True: (first pages, counts)."""
    if written.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    before = np.concatenate(([False], written[:-1]))
    after = np.concatenate((written[1:], [False]))
    cut_after = np.concatenate((cuts[1:], [True]))
    starts = np.flatnonzero(written & (~before | cuts))
    ends = np.flatnonzero(written & (~after | cut_after)) + 1
    return starts.astype(np.int64), (ends - starts).astype(np.int64)


def _cut_mask(manifest: MemoryManifest, pages: int, windows: bool) -> npt.NDArray[np.bool_]:
    page = manifest.page_size
    cuts = np.zeros(pages, dtype=bool)
    for region in manifest.regions:
        if region.file_offset % page == 0 and 0 <= region.file_offset // page < pages:
            cuts[region.file_offset // page] = True
    if windows:
        step = max(manifest.chunk_size // page, 1)
        cuts[::step] = True
    return cuts


def page_map_runs(manifest: MemoryManifest, *, windows: bool) -> tuple[Array, Array]:
    """Written runs of a compact manifest as byte ``(offsets, lengths)`` arrays.

    Runs are cut at region starts (the extents), and with ``windows`` also at
    multiples of ``chunk_size`` (the digest pieces).

    Raises:
        PageMapError: see :func:`decode_page_map`.
    """
    written = decode_page_map(manifest)
    starts, counts = _runs(written, _cut_mask(manifest, written.size, windows))
    return starts * manifest.page_size, counts * manifest.page_size


def page_map_windows(manifest: MemoryManifest) -> int:
    """How many digest windows of a compact manifest hold a written page."""
    written = decode_page_map(manifest)
    step = manifest.chunk_size // manifest.page_size
    if step <= 0 or written.size == 0:
        return 0
    padded = np.zeros(-(-written.size // step) * step, dtype=bool)
    padded[: written.size] = written
    return int(padded.reshape(-1, step).any(axis=1).sum())


def _group_by_window(offsets: Array, chunk_size: int) -> list[tuple[int, int]]:
    """``(first, stop)`` index ranges of consecutive pieces in the same window."""
    if offsets.size == 0:
        return []
    window = offsets // chunk_size
    firsts = np.flatnonzero(np.concatenate(([True], window[1:] != window[:-1])))
    stops = np.concatenate((firsts[1:], [offsets.size]))
    return list(zip(firsts.tolist(), stops.tolist(), strict=True))


def iter_digest_units(manifest: MemoryManifest) -> Iterator[DigestUnit]:
    """The stored digests in order, each with the pieces it covers (either form).

    The caller checks the digest count first (``check_compatible``); a short
    ``digests`` yields short digests that never match.
    """
    size = manifest.digest_size
    if manifest.page_map is None:
        for index, chunk in enumerate(iter_chunks(manifest.extents, manifest.chunk_size)):
            digest = manifest.digests[index * size : (index + 1) * size]
            yield DigestUnit(((chunk.offset, chunk.length),), digest, False)
        return
    offsets, lengths = page_map_runs(manifest, windows=True)
    for index, (first, stop) in enumerate(_group_by_window(offsets, manifest.chunk_size)):
        pieces = tuple(
            zip(offsets[first:stop].tolist(), lengths[first:stop].tolist(), strict=True)
        )
        yield DigestUnit(pieces, manifest.digests[index * size : (index + 1) * size], True)


def _piece_arrays(extents: Sequence[Extent], chunk_size: int) -> tuple[Array, Array]:
    """``iter_chunks`` as arrays: (piece offsets, piece lengths)."""
    starts = np.fromiter((e.offset for e in extents), dtype=np.int64, count=len(extents))
    lengths = np.fromiter((e.length for e in extents), dtype=np.int64, count=len(extents))
    if starts.size == 0:
        return starts, lengths
    ends = starts + lengths
    first = starts // chunk_size
    count = (ends - 1) // chunk_size - first + 1
    which = np.repeat(np.arange(starts.size), count)
    step = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    piece_starts = np.maximum(starts[which], (first[which] + step) * chunk_size)
    piece_ends = np.minimum(ends[which], (first[which] + step + 1) * chunk_size)
    return piece_starts, piece_ends - piece_starts


def compact_manifest(
    manifest: MemoryManifest, combine: Callable[[bytes], bytes]
) -> MemoryManifest | None:
    """The compact (page map) form of a consistent 1.0.0-form manifest, or None.

    Args:
        manifest: a manifest with its extents stored as a list and one digest
            per piece (already checked by ``check_compatible``).
        combine: the manifest's digest function, applied to concatenated digests.

    Returns None when the extents cannot be expressed as whole pages cut as a
    writer cuts them (then the 1.0.0 form is the only faithful one).
    """
    if manifest.page_map is not None:
        return manifest
    page, chunk, size = manifest.page_size, manifest.chunk_size, manifest.digest_size
    if page <= 0 or chunk <= 0 or chunk % page or manifest.file_size % page:
        return None
    extents = manifest.stored_extents
    piece_offsets, piece_lengths = _piece_arrays(extents, chunk)
    if piece_offsets.size * size != len(manifest.digests):
        return None
    if ((piece_offsets % page) != 0).any() or ((piece_lengths % page) != 0).any():
        return None
    pages = manifest.file_size // page
    if (pages + 7) // 8 > MAX_PAGE_MAP_BYTES:
        return None
    delta = np.zeros(pages + 1, dtype=np.int64)
    np.add.at(delta, piece_offsets // page, 1)
    np.add.at(delta, (piece_offsets + piece_lengths) // page, -1)
    written = np.cumsum(delta[:pages]) > 0
    candidate = attrs.evolve(manifest, extents=(), digests=b"", page_map=encode_page_map(written))
    offsets, lengths = page_map_runs(candidate, windows=True)
    if not (np.array_equal(offsets, piece_offsets) and np.array_equal(lengths, piece_lengths)):
        return None  # the extents are not cut at region starts as a writer cuts them
    table = np.frombuffer(manifest.digests, dtype=np.uint8).reshape(-1, size)
    digests = b"".join(
        combine(table[first:stop].tobytes())
        for first, stop in _group_by_window(offsets, chunk)
    )
    return attrs.evolve(candidate, digests=digests)
