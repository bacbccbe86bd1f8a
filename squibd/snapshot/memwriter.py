"""Streaming guest memory into a memory file (SPEC sections 4 and 5).

Theory of operation
-------------------
The caller hands an open, writable fd (``PairTransaction.mem_fd``) and the
regions as read sources. The writer

1. sizes the file to the whole memory (``ftruncate``: the rest are holes);
2. plans work units, each inside one region and one digest chunk
   (``manifest.iter_chunks`` cut, at most ``chunk_size`` bytes, aligned to
   multiples of ``chunk_size`` in the file):
   - Diff: exactly the dirty runs, in pages;
   - Full of a memfd region: the touched extents of the memfd
     (``SEEK_DATA``/``SEEK_HOLE``), never-touched RAM stays a hole;
   - Full of a region without fd (private file mapping after a restore,
     anonymous userfaultfd mapping): every chunk window of the region is
     scanned, its non-zero pages are written, all-zero pages stay holes;
3. runs ``writers`` threads that take units in order, digest each piece in
   the thread (the hash releases the GIL on large inputs) and write it with
   the chosen primitive (``pwrite`` from the mapping by default; see
   ``WRITE_METHODS``), checking ``cancel`` between units;
4. returns the written extents and the per-chunk digests in file order,
   independent of the number of writers.

Progress is reported in the calling thread as ``(bytes_done, bytes_total)``.
Every ``OSError`` becomes ``MemoryIo`` with the errno text; bad input is
``MemoryInputInvalid``. The writer never fsyncs: committing is the pair
transaction's job.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import uuid
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import attrs
import numpy as np

from .bitmap import HOST_PAGE_SIZE
from .digest import DEFAULT_ALGORITHM, digest_function
from .errors import MemoryIo
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    KIND_DIFF,
    KIND_FULL,
    Extent,
    MemoryManifest,
    MemoryRegion,
)
from .memerrors import MemoryInputInvalid

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_WRITERS",
    "PAIR_XATTR",
    "WRITE_METHODS",
    "RegionSource",
    "WriteCancelled",
    "WriteResult",
    "build_manifest",
    "merge_extents",
    "new_pair_id",
    "read_pair_xattr",
    "set_pair_xattr",
    "write_memory",
]

#: Writer threads used by default (bench/memory_save.py: a second thread helps
#: digest and page-cache copies overlap; more do not help on one file).
DEFAULT_WRITERS: Final = 2
#: ``pwrite`` from the mapping, ``sendfile`` from the memfd (falls back to
#: pwrite for regions without fd), ``direct`` (O_DIRECT pwrite; falls back to
#: pwrite where the filesystem refuses it).
WRITE_METHODS: Final = ("pwrite", "sendfile", "direct")
#: Chosen by bench/memory_save.py (durable 1 GiB; see the module doc there).
DEFAULT_METHOD: Final = "pwrite"
#: SPEC section 4: the extended attribute binding a memory file to its pair.
PAIR_XATTR: Final = "user.squibd.pair"
#: Errors meaning "this filesystem keeps no user xattrs": not a failure.
_XATTR_UNSUPPORTED: Final = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})


class WriteCancelled(Exception):
    """The ``cancel`` event was set; the file is partial and must be discarded."""


class RegionSource(Protocol):
    """What the writer reads from (``squibd.vm.memory.GuestRegion`` is one)."""

    @property
    def guest_addr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def file_offset(self) -> int: ...
    @property
    def view(self) -> memoryview: ...
    @property
    def fd(self) -> int | None: ...


@attrs.frozen
class WriteResult:
    """What :func:`write_memory` wrote: extents in file order and one digest per chunk."""

    extents: tuple[Extent, ...]
    digests: bytes
    bytes_written: int
    pages_written: int
    file_size: int
    algorithm: str
    chunk_size: int


@attrs.frozen
class _Unit:
    """One piece of work: ``length`` bytes at ``offset`` (region-relative) of one region."""

    region: int
    offset: int
    length: int
    scan: bool  # write only the non-zero pages of this window


Piece = tuple[int, int, bytes]  # (file offset, length, digest)


def new_pair_id() -> str:
    """A fresh random pair id (SPEC section 4: a random UUID)."""
    return str(uuid.uuid4())


def set_pair_xattr(fd: int, pair_id: str) -> bool:
    """Store ``pair_id`` in the ``user.squibd.pair`` xattr; False where unsupported.

    Raises:
        MemoryIo: any other failure of ``fsetxattr``.
    """
    try:
        os.setxattr(fd, PAIR_XATTR, pair_id.encode())
    except OSError as error:
        if error.errno in _XATTR_UNSUPPORTED:
            return False
        raise MemoryIo(error) from error
    return True


def read_pair_xattr(path_or_fd: str | int) -> str | None:
    """The pair id stored on a memory file, or None when absent or unsupported."""
    try:
        return os.getxattr(path_or_fd, PAIR_XATTR).decode(errors="replace")
    except OSError as error:
        if error.errno in _XATTR_UNSUPPORTED or error.errno == errno.ENODATA:
            return None
        raise MemoryIo(error) from error


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


def _check_regions(regions: Sequence[RegionSource], page_size: int) -> int:
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


def _memfd_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """Touched ``(offset, length)`` ranges of a memfd, via SEEK_DATA/SEEK_HOLE."""
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


def _cut(region_index: int, base: int, start: int, length: int, chunk: int, scan: bool,
         out: list[_Unit]) -> None:
    """Append units for region bytes ``[start, start+length)`` cut at file chunk boundaries."""
    offset, end = start, start + length
    while offset < end:
        boundary = ((base + offset) // chunk + 1) * chunk - base
        stop = min(end, boundary)
        out.append(_Unit(region_index, offset, stop - offset, scan))
        offset = stop


def _plan(regions: Sequence[RegionSource], kind: str,
          runs_per_region: Sequence[Sequence[tuple[int, int]]] | None,
          page_size: int, chunk: int) -> list[_Unit]:
    units: list[_Unit] = []
    if kind == KIND_DIFF:
        if runs_per_region is None:
            raise MemoryInputInvalid("a Diff needs the dirty runs of every region")
        if len(runs_per_region) != len(regions):
            raise MemoryInputInvalid(
                f"{len(runs_per_region)} run lists for {len(regions)} regions"
            )
    elif kind != KIND_FULL:
        raise MemoryInputInvalid(f"unknown snapshot kind {kind!r} (expected Full or Diff)")
    for index, region in enumerate(regions):
        npages = region.size // page_size
        ranges: list[tuple[int, int]]
        if runs_per_region is not None:
            spans = []
            for first, count in runs_per_region[index]:
                if first < 0 or count <= 0 or first + count > npages:
                    raise MemoryInputInvalid(
                        f"run of pages [{first}, {first + count}) lies outside region {index} "
                        f"({npages} pages)"
                    )
                spans.append(Extent(first * page_size, count * page_size))
            ranges = [(e.offset, e.length) for e in merge_extents(spans)]
            scan = False
        elif region.fd is not None:
            ranges = _memfd_extents(region.fd, region.size)
            scan = False
        else:
            ranges = [(0, region.size)]
            scan = True
        for start, length in ranges:
            _cut(index, region.file_offset, start, length, chunk, scan, units)
    return units


def _nonzero_page_runs(data: memoryview, page_size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` byte runs of the non-zero pages of ``data``."""
    pages = np.frombuffer(data, dtype=np.uint64).reshape(-1, page_size // 8)
    touched = pages.any(axis=1)
    del pages
    if not touched.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], touched, [False])).astype(np.int8)))
    starts, ends = edges[0::2], edges[1::2]
    return [(int(s) * page_size, int(e - s) * page_size) for s, e in zip(starts, ends, strict=True)]


class _Writer:
    """One writer thread's state: its primitive and (for sendfile/direct) its own fd."""

    def __init__(self, out_fd: int, method: str) -> None:
        self.out_fd = out_fd
        self.method = method
        self.own_fd: int | None = None
        if method in ("sendfile", "direct"):
            flags = os.O_WRONLY | os.O_CLOEXEC | (os.O_DIRECT if method == "direct" else 0)
            try:
                # A new open file description: its own position for sendfile.
                self.own_fd = os.open(f"/proc/self/fd/{out_fd}", flags)
            except OSError as error:
                if error.errno != errno.EINVAL:  # EINVAL: no O_DIRECT here
                    raise
                self.method = "pwrite"

    def close(self) -> None:
        if self.own_fd is not None:
            os.close(self.own_fd)
            self.own_fd = None

    def write(self, source: RegionSource, view: memoryview, offset: int, file_offset: int
              ) -> None:
        """Write ``view`` (region bytes at ``offset``) at ``file_offset`` of the output."""
        if self.method == "sendfile" and source.fd is not None and self.own_fd is not None:
            self._sendfile(source.fd, offset, len(view), file_offset)
            return
        if self.method == "direct" and self.own_fd is not None:
            try:
                self._pwrite(self.own_fd, view, file_offset)
                return
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.method = "pwrite"  # the filesystem refuses this direct write
        self._pwrite(self.out_fd, view, file_offset)

    @staticmethod
    def _pwrite(fd: int, view: memoryview, file_offset: int) -> None:
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], file_offset + done)

    def _sendfile(self, in_fd: int, offset: int, length: int, file_offset: int) -> None:
        assert self.own_fd is not None
        os.lseek(self.own_fd, file_offset, os.SEEK_SET)
        done = 0
        while done < length:
            sent = os.sendfile(self.own_fd, in_fd, offset + done, length - done)
            if sent == 0:
                raise MemoryIo(errno.EIO)  # the memfd is shorter than its region
            done += sent


def write_memory(
    out_fd: int,
    regions: Sequence[RegionSource],
    *,
    kind: str,
    runs_per_region: Sequence[Sequence[tuple[int, int]]] | None = None,
    writers: int = DEFAULT_WRITERS,
    progress: Callable[[int, int], None] | None = None,
    algorithm: str = DEFAULT_ALGORITHM,
    cancel: threading.Event | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    page_size: int = HOST_PAGE_SIZE,
    method: str = DEFAULT_METHOD,
) -> WriteResult:
    """Write guest memory into ``out_fd`` (see the module doc).

    Args:
        out_fd: the temp memory file, open for writing; it is resized to the memory size.
        regions: read sources in file order (contiguous from offset 0).
        kind: ``"Full"`` or ``"Diff"``.
        runs_per_region: for a Diff, ``(first_page, npages)`` runs per region.
        writers: number of writer threads (1 writes in the calling thread).
        progress: called in the calling thread with ``(bytes_done, bytes_total)``.
        algorithm: digest algorithm (``"xxh3-64"`` or ``"blake3"``).
        cancel: checked between units; when set, :class:`WriteCancelled` is raised.
        chunk_size: digest chunk size (SPEC section 4: at most 2 MiB).
        page_size: the page of the runs (default: the host page).
        method: one of ``WRITE_METHODS``.

    Raises:
        MemoryIo: an I/O error (``MemoryInputInvalid`` for bad input).
        WriteCancelled: ``cancel`` was set.
    """
    if writers < 1:
        raise MemoryInputInvalid(f"writers must be at least 1, got {writers}")
    if method not in WRITE_METHODS:
        raise MemoryInputInvalid(f"unknown write method {method!r}")
    total_size = _check_regions(regions, page_size)
    if chunk_size <= 0 or chunk_size % page_size:
        raise MemoryInputInvalid(f"chunk size {chunk_size} is not a multiple of the page")
    hash_of = digest_function(algorithm)
    try:
        units = _plan(regions, kind, runs_per_region, page_size, chunk_size)
        os.ftruncate(out_fd, total_size)
    except OSError as error:
        raise MemoryIo(error) from error
    total = sum(unit.length for unit in units)
    results: list[list[Piece]] = [[] for _ in units]
    stop = threading.Event()
    failures: list[BaseException] = []
    next_unit = iter(range(len(units)))
    take_lock = threading.Lock()
    done_queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()

    def run_unit(writer: _Writer, index: int) -> None:
        unit = units[index]
        source = regions[unit.region]
        if unit.scan:
            with source.view[unit.offset : unit.offset + unit.length] as window:
                found = _nonzero_page_runs(window, page_size)
            spans = [(unit.offset + s, n) for s, n in found]
        else:
            spans = [(unit.offset, unit.length)]
        pieces = results[index]
        for start, length in spans:
            file_offset = source.file_offset + start
            with source.view[start : start + length] as piece:
                digest = hash_of(piece)
                writer.write(source, piece, start, file_offset)
            pieces.append((file_offset, length, digest))

    def work() -> None:
        writer: _Writer | None = None
        try:
            writer = _Writer(out_fd, method)
            while not stop.is_set():
                if cancel is not None and cancel.is_set():
                    stop.set()
                    break
                with take_lock:
                    index = next(next_unit, None)
                if index is None:
                    break
                run_unit(writer, index)
                done_queue.put(units[index].length)
        except BaseException as error:
            failures.append(error)
            stop.set()
        finally:
            if writer is not None:
                writer.close()
            done_queue.put(None)

    threads = [threading.Thread(target=work, name=f"squibd-memwriter-{i}", daemon=True)
               for i in range(min(writers, max(1, len(units))))]
    for thread in threads:
        thread.start()
    done_bytes = 0
    running = len(threads)
    try:
        while running:
            item = done_queue.get()
            if item is None:
                running -= 1
                continue
            done_bytes += item
            if progress is not None:
                progress(done_bytes, total)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    if failures:
        failure = failures[0]
        if isinstance(failure, OSError):
            raise MemoryIo(failure) from failure
        raise failure
    if cancel is not None and cancel.is_set():
        raise WriteCancelled("memory write cancelled")
    pieces = [piece for unit_pieces in results for piece in unit_pieces]
    extents = _extents_by_region(pieces, regions)
    written = sum(length for _, length, _ in pieces)
    return WriteResult(
        extents=extents,
        digests=b"".join(digest for _, _, digest in pieces),
        bytes_written=written,
        pages_written=written // page_size,
        file_size=total_size,
        algorithm=algorithm,
        chunk_size=chunk_size,
    )


def _extents_by_region(pieces: Sequence[Piece], regions: Sequence[RegionSource]) -> tuple[
        Extent, ...]:
    """Coalesce pieces into extents, never across a region boundary."""
    boundaries = {region.file_offset for region in regions}
    merged: list[Extent] = []
    for offset, length, _ in pieces:
        if merged and merged[-1].end == offset and offset not in boundaries:
            last = merged.pop()
            merged.append(Extent(last.offset, last.length + length))
        else:
            merged.append(Extent(offset, length))
    return tuple(merged)


class _HasLayout(Protocol):
    @property
    def guest_addr(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def file_offset(self) -> int: ...


def build_manifest(
    write_result: WriteResult,
    regions: Sequence[_HasLayout],
    *,
    kind: str,
    pair_id: str,
    parent_pair_id: str | None,
    page_size: int = HOST_PAGE_SIZE,
) -> MemoryManifest:
    """The manifest of a memory file written by :func:`write_memory`.

    Raises:
        MemoryInputInvalid: a Diff without ``parent_pair_id``, or a Full with one.
    """
    if kind == KIND_DIFF and not parent_pair_id:
        raise MemoryInputInvalid("a Diff manifest needs the parent pair id")
    if kind == KIND_FULL and parent_pair_id is not None:
        raise MemoryInputInvalid("a Full manifest has no parent pair id")
    if kind not in (KIND_FULL, KIND_DIFF):
        raise MemoryInputInvalid(f"unknown snapshot kind {kind!r}")
    return MemoryManifest(
        page_size=page_size,
        regions=tuple(MemoryRegion(r.guest_addr, r.size, r.file_offset) for r in regions),
        kind=kind,
        file_size=write_result.file_size,
        pair_id=pair_id,
        parent_pair_id=parent_pair_id,
        extents=write_result.extents,
        digest_algorithm=write_result.algorithm,
        chunk_size=write_result.chunk_size,
        digests=write_result.digests,
    )
