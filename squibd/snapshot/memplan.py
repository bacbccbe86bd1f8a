"""Planning a memory-file write: which bytes go where (SPEC sections 4 and 5).

``plan_units`` turns the regions (and, for a Diff, the dirty runs) into work
units for the writer threads. Each unit lies inside one region and one
digest chunk (cut at multiples of ``chunk_size`` in the file, the
``manifest.iter_chunks`` cut), so digests computed per unit are exactly the
manifest's per-chunk digests:

- Diff: the dirty runs, merged, in pages;
- Full of a memfd region: its touched extents (``SEEK_DATA``/``SEEK_HOLE``);
- Full of a region without fd: every chunk window, marked ``scan``: the
  writer writes only its non-zero pages (``nonzero_page_runs``).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Final, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from .manifest import KIND_DIFF, KIND_FULL, Extent
from .memerrors import MemoryInputInvalid

__all__ = [
    "BATCH_BYTES",
    "BATCH_UNITS",
    "RegionLayout",
    "RegionSource",
    "RunsLike",
    "WorkPlan",
    "check_regions",
    "memfd_extents",
    "merge_extents",
    "nonzero_page_runs",
    "plan_units",
]


class RegionLayout(Protocol):
    """Where a region sits: guest-physical address, size, offset in the memory file."""

    @property
    def guest_addr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def file_offset(self) -> int: ...


class RegionSource(RegionLayout, Protocol):
    """What the writer reads from (``squibd.vm.memory.GuestRegion`` is one)."""

    @property
    def view(self) -> memoryview: ...
    @property
    def fd(self) -> int | None: ...



Array = npt.NDArray[np.int64]
#: A region's dirty runs: ``(first_page, npages)`` pairs, or an ``(n, 2)`` int array
#: of them (``DirtyBitmap.snapshot_run_table``).
RunsLike = Sequence[tuple[int, int]] | npt.NDArray[np.int64]

#: A writer thread takes units in batches of at most this many bytes or units
#: (fewer lock and queue hand-offs for Diffs of many single pages).
BATCH_BYTES: Final = 8 * 1024 * 1024
BATCH_UNITS: Final = 256


@attrs.frozen
class WorkPlan:
    """The units of one write, in file order, as parallel lists.

    Unit ``i`` is ``lengths[i]`` bytes at region-relative ``offsets[i]`` of region
    ``regions[i]``; ``scan[i]`` asks the writer to write only its non-zero pages.
    ``batches`` are ``(first, stop)`` unit index ranges handed to writer threads.
    """

    regions: list[int]
    offsets: list[int]
    lengths: list[int]
    scan: list[bool]
    batches: list[tuple[int, int]]

    @property
    def total(self) -> int:
        """Bytes covered by the units (an upper bound of what scan units write)."""
        return sum(self.lengths)


def merge_extents(extents: Sequence[Extent]) -> tuple[Extent, ...]:
    """Sort and coalesce overlapping or adjacent extents."""
    merged: list[Extent] = []
    for extent in sorted(extents, key=lambda e: e.offset):
        if extent.length <= 0:
            continue
        if merged and extent.offset <= merged[-1].end:
            last = merged.pop()
            extent = Extent(last.offset, max(last.end, extent.end) - last.offset)
        merged.append(extent)
    return tuple(merged)


def check_regions(regions: Sequence[RegionSource], page_size: int) -> int:
    """Check the regions are page-aligned and contiguous from offset 0; returns the total size.

    Raises:
        MemoryInputInvalid: naming the first bad region (or a non-power-of-two page).
    """
    if page_size <= 0 or page_size & (page_size - 1):
        raise MemoryInputInvalid(f"page size {page_size} is not a power of two")
    if not regions:
        raise MemoryInputInvalid("no memory regions to write")
    expected = 0
    for index, region in enumerate(regions):
        if region.file_offset != expected:
            raise MemoryInputInvalid(
                f"region {index} starts at file offset {region.file_offset}, expected {expected}"
            )
        if region.size <= 0 or region.size % page_size:
            raise MemoryInputInvalid(
                f"region {index} size {region.size} is not a positive multiple of the "
                f"{page_size}-byte page"
            )
        if len(region.view) != region.size:
            raise MemoryInputInvalid(
                f"region {index} maps {len(region.view)} bytes but declares {region.size}"
            )
        expected += region.size
    return expected


def memfd_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Touched ``(offset, length)`` ranges of a memfd (or any file), via SEEK_DATA/SEEK_HOLE."""
    found: list[tuple[int, int]] = []
    position = 0
    while position < size:
        try:
            start = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:
            if error.errno == errno.ENXIO:  # no data past position
                break
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        found.append((start, end - start))
        position = end
    return found


def _merge_runs(runs: RunsLike, npages: int, index: int) -> tuple[Array, Array]:
    """Validate, sort and coalesce page runs; returns (first pages, page counts)."""
    table = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    if table.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    firsts, counts = table[:, 0], table[:, 1]
    bad = (firsts < 0) | (counts <= 0) | (firsts + counts > npages)
    if bad.any():
        first, count = (int(v) for v in table[int(np.flatnonzero(bad)[0])])
        raise MemoryInputInvalid(
            f"run of pages [{first}, {first + count}) lies outside region {index} "
            f"({npages} pages)"
        )
    order = np.argsort(firsts, kind="stable")
    firsts, ends = firsts[order], (firsts + counts)[order]
    reach = np.maximum.accumulate(ends)
    new_group = np.concatenate(([True], firsts[1:] > reach[:-1]))
    starts_at = np.flatnonzero(new_group)
    merged_ends = np.maximum.reduceat(ends, starts_at)
    return firsts[starts_at], merged_ends - firsts[starts_at]


def _cut(base: int, starts: Array, lengths: Array, chunk: int) -> tuple[Array, Array]:
    """Cut region ranges at multiples of ``chunk`` in the file (``base`` = region offset)."""
    if starts.size == 0:
        return starts, lengths
    file_starts = starts + base
    file_ends = file_starts + lengths
    first_chunk = file_starts // chunk
    pieces = (file_ends - 1) // chunk - first_chunk + 1
    which = np.repeat(np.arange(starts.size), pieces)
    step = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    piece_starts = np.maximum(file_starts[which], (first_chunk[which] + step) * chunk)
    piece_ends = np.minimum(file_ends[which], (first_chunk[which] + step + 1) * chunk)
    return piece_starts - base, piece_ends - piece_starts


def _batches(lengths: list[int]) -> list[tuple[int, int]]:
    """Cut units into batches: a new batch every ``BATCH_UNITS`` units or ``BATCH_BYTES``."""
    if not lengths:
        return []
    sizes = np.asarray(lengths, dtype=np.int64)
    before = np.cumsum(sizes) - sizes  # bytes before each unit
    index = np.arange(sizes.size)
    key_units, key_bytes = index // BATCH_UNITS, before // BATCH_BYTES
    new = np.concatenate(([True], (key_units[1:] != key_units[:-1])
                          | (key_bytes[1:] != key_bytes[:-1])))
    firsts = np.flatnonzero(new)
    stops = np.concatenate((firsts[1:], [sizes.size]))
    return list(zip(firsts.tolist(), stops.tolist(), strict=True))


def plan_units(
    regions: Sequence[RegionSource],
    kind: str,
    runs_per_region: Sequence[RunsLike] | None,
    page_size: int,
    chunk: int,
) -> WorkPlan:
    """Plan a write (see the module doc).

    Raises:
        MemoryInputInvalid: unknown kind, missing or out-of-region runs.
        OSError: ``SEEK_DATA``/``SEEK_HOLE`` failed on a memfd.
    """
    if kind == KIND_DIFF:
        if runs_per_region is None:
            raise MemoryInputInvalid("a Diff needs the dirty runs of every region")
        if len(runs_per_region) != len(regions):
            raise MemoryInputInvalid(f"{len(runs_per_region)} run lists for {len(regions)} regions")
    elif kind != KIND_FULL:
        raise MemoryInputInvalid(f"unknown snapshot kind {kind!r} (expected Full or Diff)")
    unit_regions: list[int] = []
    offsets: list[int] = []
    lengths: list[int] = []
    scan: list[bool] = []
    for index, region in enumerate(regions):
        scanning = False
        if runs_per_region is not None:
            firsts, counts = _merge_runs(runs_per_region[index], region.size // page_size, index)
            starts, sizes = firsts * page_size, counts * page_size
        elif region.fd is not None:
            found = memfd_extents(region.fd, region.size)
            table = np.asarray(found, dtype=np.int64).reshape(-1, 2)
            starts, sizes = table[:, 0], table[:, 1]
        else:
            starts = np.zeros(1, dtype=np.int64)
            sizes = np.full(1, region.size, dtype=np.int64)
            scanning = True
        cut_starts, cut_lengths = _cut(region.file_offset, starts, sizes, chunk)
        offsets += cut_starts.tolist()
        lengths += cut_lengths.tolist()
        unit_regions += [index] * cut_starts.size
        scan += [scanning] * cut_starts.size
    return WorkPlan(unit_regions, offsets, lengths, scan, _batches(lengths))


def nonzero_page_runs(data: memoryview, page_size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` byte runs of the non-zero pages of ``data``."""
    pages = np.frombuffer(data, dtype=np.uint64).reshape(-1, page_size // 8)
    touched = pages.any(axis=1)
    del pages
    if not touched.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], touched, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    return [(int(s) * page_size, int(e - s) * page_size) for s, e in zip(starts, ends, strict=True)]
