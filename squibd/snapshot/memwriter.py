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
   the chosen primitive (by default O_DIRECT ``pwrite`` from the mapping for
   large pieces, buffered ``pwrite`` for small ones; see ``WRITE_METHODS``),
   checking ``cancel`` between batches of units;
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
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import attrs
import numpy as np
import numpy.typing as npt

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
from .memplan import (
    RegionLayout,
    RegionSource,
    RunsLike,
    WorkPlan,
    check_regions,
    merge_extents,
    plan_units,
)
from .memplan import nonzero_page_runs as _nonzero_page_runs
from .pairing import PAIR_XATTR, new_pair_id, read_pair_xattr, set_pair_xattr

__all__ = [
    "DEFAULT_METHOD",
    "DEFAULT_WRITERS",
    "DIRECT_MIN_BYTES",
    "PAIR_XATTR",
    "WRITE_METHODS",
    "RegionSource",
    "WriteCancelled",
    "WriteResult",
    "WriterThreads",
    "build_manifest",
    "merge_extents",
    "new_pair_id",
    "read_pair_xattr",
    "set_pair_xattr",
    "write_memory",
]

#: Writer threads used by default (bench/memory_save.py, durable 1 GiB Full: two
#: writers keep two O_DIRECT requests in flight and beat one; this host has 2 cores).
DEFAULT_WRITERS: Final = 2
#: Write primitives: ``pwrite`` from the mapping, ``sendfile`` from the memfd (falls
#: back to pwrite for regions without fd), ``direct`` (O_DIRECT pwrite; falls back to
#: pwrite where the filesystem refuses it), ``auto``: O_DIRECT for pieces of at least
#: ``DIRECT_MIN_BYTES`` and buffered pwrite for smaller ones (a Diff's single pages
#: would each become a synchronous disk write).
WRITE_METHODS: Final = ("auto", "pwrite", "sendfile", "direct")
#: Chosen by bench/memory_save.py: for a durable 1 GiB Full, O_DIRECT with 2 writers
#: beat buffered pwrite and sendfile (fsync then has almost nothing left to flush).
DEFAULT_METHOD: Final = "auto"
#: Smallest piece ``auto`` writes with O_DIRECT (256 KiB: below it the per-request
#: disk latency outweighs the saved page-cache copy).
DIRECT_MIN_BYTES: Final = 256 * 1024


class WriteCancelled(Exception):
    """The ``cancel`` event was set; the file is partial and must be discarded."""


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


Piece = tuple[int, int, bytes]  # (file offset, length, digest)


class _Writer:
    """One writer thread's state: its primitive and (for sendfile/direct) its own fd."""

    def __init__(self, out_fd: int, method: str) -> None:
        self.out_fd = out_fd
        self.method = method
        self.own_fd: int | None = None
        if method in ("sendfile", "direct", "auto"):
            direct = os.O_DIRECT if method in ("direct", "auto") else 0
            flags = os.O_WRONLY | os.O_CLOEXEC | direct
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
        direct = self.method == "direct" or (
            self.method == "auto" and len(view) >= DIRECT_MIN_BYTES
        )
        if direct and self.own_fd is not None:
            try:
                self._pwrite(self.own_fd, view, file_offset)
                return
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise
                self.method = "pwrite"  # the filesystem refuses this direct write
        self._pwrite(self.out_fd, view, file_offset)

    def buffered(self, length: int) -> bool:
        """Whether a piece of ``length`` bytes takes the plain buffered pwrite path."""
        if self.method == "pwrite" or self.own_fd is None:
            return True
        return self.method == "auto" and length < DIRECT_MIN_BYTES

    @staticmethod
    def pwrite_all(fd: int, view: memoryview, file_offset: int) -> None:
        """pwrite until every byte of ``view`` is written."""
        _Writer._pwrite(fd, view, file_offset)

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


class Joinable(Protocol):
    """A started writer thread."""

    def join(self, timeout: float | None = None) -> None: ...


class WriterThreads(Protocol):
    """Where a write's helper threads come from (e.g. the VM runtime's bounded pool).

    ``start(count, target)`` starts at most ``count`` threads running
    ``target`` and returns them; it may start fewer, even none (the write then
    runs in the calling thread).
    """

    def start(self, count: int, target: Callable[[], None]) -> Sequence[Joinable]: ...


class _FreshThreads:
    """The default: ``count`` new daemon threads."""

    def start(self, count: int, target: Callable[[], None]) -> Sequence[Joinable]:
        threads = [threading.Thread(target=target, name=f"squibd-memwriter-{i}", daemon=True)
                   for i in range(count)]
        for thread in threads:
            thread.start()
        return threads


def write_memory(
    out_fd: int,
    regions: Sequence[RegionSource],
    *,
    kind: str,
    runs_per_region: Sequence[RunsLike] | None = None,
    writers: int = DEFAULT_WRITERS,
    progress: Callable[[int, int], None] | None = None,
    algorithm: str = DEFAULT_ALGORITHM,
    cancel: threading.Event | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    page_size: int = HOST_PAGE_SIZE,
    method: str = DEFAULT_METHOD,
    threads: WriterThreads | None = None,
) -> WriteResult:
    """Write guest memory into ``out_fd`` (see the module doc).

    Args:
        out_fd: the temp memory file, open for writing; it is resized to the memory size.
        regions: read sources in file order (contiguous from offset 0).
        kind: ``"Full"`` or ``"Diff"``.
        runs_per_region: for a Diff, ``(first_page, npages)`` runs per region (a list
            of pairs or an ``(n, 2)`` int array, e.g. ``DirtyBitmap.snapshot_run_table``).
        writers: number of writer threads (1 writes in the calling thread); a plan of
            mostly small pieces is written by one thread whatever this says.
        progress: called in the calling thread with ``(bytes_done, bytes_total)``.
        algorithm: digest algorithm (``"xxh3-64"`` or ``"blake3"``).
        cancel: checked between batches of units; when set, :class:`WriteCancelled`
            is raised.
        chunk_size: digest chunk size (SPEC section 4: at most 2 MiB).
        page_size: the page of the runs (default: the host page).
        method: one of ``WRITE_METHODS``.
        threads: where the helper threads come from (default: fresh threads);
            the owner of a pool sees and bounds them.

    Raises:
        MemoryIo: an I/O error (``MemoryInputInvalid`` for bad input).
        WriteCancelled: ``cancel`` was set.
    """
    if writers < 1:
        raise MemoryInputInvalid(f"writers must be at least 1, got {writers}")
    if method not in WRITE_METHODS:
        raise MemoryInputInvalid(f"unknown write method {method!r}")
    total_size = check_regions(regions, page_size)
    if not 0 < chunk_size <= DEFAULT_CHUNK_SIZE or chunk_size % page_size:
        raise MemoryInputInvalid(
            f"chunk size {chunk_size} is not a page multiple of at most {DEFAULT_CHUNK_SIZE}"
        )
    hash_of = digest_function(algorithm)
    try:
        plan = plan_units(regions, kind, runs_per_region, page_size, chunk_size)
        os.ftruncate(out_fd, total_size)
    except OSError as error:
        raise MemoryIo(error) from error
    if plan.lengths and plan.total < len(plan.lengths) * DIRECT_MIN_BYTES:
        # Mostly small buffered pieces (a Diff of scattered pages): they serialize on
        # the file's inode lock, so more threads only add GIL hand-offs (measured
        # slower with 2 writers in bench/diff_save.py).
        writers = 1
    run = _Run(plan, regions, hash_of, page_size, out_fd, method, cancel)
    run.execute(writers, progress, threads if threads is not None else _FreshThreads())
    starts, lengths, digests = run.extents_and_digests()
    written = int(lengths.sum())
    return WriteResult(
        extents=_coalesce(starts, lengths, regions),
        digests=digests,
        bytes_written=written,
        pages_written=written // page_size,
        file_size=total_size,
        algorithm=algorithm,
        chunk_size=chunk_size,
    )


class _Run:
    """The state of one write shared by its writer threads."""

    def __init__(self, plan: WorkPlan, regions: Sequence[RegionSource],
                 hash_of: Callable[[memoryview], bytes], page_size: int, out_fd: int,
                 method: str, cancel: threading.Event | None) -> None:
        self.plan = plan
        self.regions = regions
        self.hash_of = hash_of
        self.page_size = page_size
        self.out_fd = out_fd
        self.method = method
        self.cancel = cancel
        self.digests: list[bytes | None] = [None] * len(plan.lengths)
        #: Pieces of scan units (their non-zero page runs), by unit index.
        self.scanned: dict[int, list[Piece]] = {}
        self.stop = threading.Event()
        self.failures: list[BaseException] = []
        self._next_batch = iter(plan.batches)
        self._take = threading.Lock()

    def _unit(self, writer: _Writer, index: int) -> None:
        plan = self.plan
        source = self.regions[plan.regions[index]]
        offset, length = plan.offsets[index], plan.lengths[index]
        if not plan.scan[index]:
            with source.view[offset : offset + length] as piece:
                self.digests[index] = self.hash_of(piece)
                writer.write(source, piece, offset, source.file_offset + offset)
            return
        with source.view[offset : offset + length] as window:
            found = _nonzero_page_runs(window, self.page_size)
        pieces: list[Piece] = []
        for start, size in found:
            start += offset
            with source.view[start : start + size] as piece:
                digest = self.hash_of(piece)
                writer.write(source, piece, start, source.file_offset + start)
            pieces.append((source.file_offset + start, size, digest))
        self.scanned[index] = pieces

    def _batches(self, report: Callable[[int], None]) -> None:
        writer = _Writer(self.out_fd, self.method)
        plan = self.plan
        # Hot loop of a Diff (thousands of single pages): locals, no per-unit calls
        # beyond hash and pwrite for pieces that take the buffered path.
        unit_regions, offsets, lengths, scan = plan.regions, plan.offsets, plan.lengths, plan.scan
        views = [region.view for region in self.regions]
        bases = [region.file_offset for region in self.regions]
        hash_of, digests, out_fd, pwrite = self.hash_of, self.digests, self.out_fd, os.pwrite
        try:
            while not self.stop.is_set():
                if self.cancel is not None and self.cancel.is_set():
                    self.stop.set()
                    break
                with self._take:
                    batch = next(self._next_batch, None)
                if batch is None:
                    break
                first, stop = batch
                for index in range(first, stop):
                    length = lengths[index]
                    if scan[index] or not writer.buffered(length):
                        self._unit(writer, index)
                        continue
                    region, offset = unit_regions[index], offsets[index]
                    file_offset = bases[region] + offset
                    with views[region][offset : offset + length] as piece:
                        digests[index] = hash_of(piece)
                        done = pwrite(out_fd, piece, file_offset)
                        if done < length:
                            _Writer.pwrite_all(out_fd, piece[done:], file_offset + done)
                report(sum(lengths[first:stop]))
        finally:
            writer.close()

    def execute(self, writers: int, progress: Callable[[int, int], None] | None,
                threads: WriterThreads) -> None:
        total = self.plan.total
        done = 0
        if writers == 1 or len(self.plan.batches) <= 1 or not self._threads(
            min(writers, len(self.plan.batches)), progress, total, threads
        ):

            def report_here(size: int) -> None:
                nonlocal done
                done += size
                if progress is not None:
                    progress(done, total)

            try:
                self._batches(report_here)
            except OSError as error:
                raise MemoryIo(error) from error
        if self.cancel is not None and self.cancel.is_set():
            raise WriteCancelled("memory write cancelled")

    def _threads(self, count: int, progress: Callable[[int, int], None] | None,
                 total: int, source: WriterThreads) -> bool:
        """Write with up to ``count`` threads of ``source``; False if it gave none."""
        done_queue: queue.SimpleQueue[int | None] = queue.SimpleQueue()

        def work() -> None:
            try:
                self._batches(done_queue.put)
            except BaseException as error:
                self.failures.append(error)
                self.stop.set()
            finally:
                done_queue.put(None)

        threads = source.start(count, work)
        if not threads:
            return False
        done, running = 0, len(threads)
        try:
            while running:
                item = done_queue.get()
                if item is None:
                    running -= 1
                    continue
                done += item
                if progress is not None:
                    progress(done, total)
        finally:
            self.stop.set()
            for thread in threads:
                thread.join()
        if self.failures:
            failure = self.failures[0]
            if isinstance(failure, OSError):
                raise MemoryIo(failure) from failure
            raise failure
        return True

    def extents_and_digests(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], bytes]:
        """Written pieces in file order: (file offsets, lengths, concatenated digests)."""
        plan = self.plan
        if not any(plan.scan):
            bases = np.asarray([r.file_offset for r in self.regions], dtype=np.int64)
            starts = bases[np.asarray(plan.regions, dtype=np.int64)] + np.asarray(
                plan.offsets, dtype=np.int64
            )
            digests = [d for d in self.digests if d is not None]
            if len(digests) != len(plan.lengths):
                raise MemoryIo(errno.EIO)  # a unit was not written: cannot happen after success
            return starts.reshape(-1), np.asarray(plan.lengths, dtype=np.int64), b"".join(digests)
        pieces = self.pieces()
        return (
            np.asarray([offset for offset, _, _ in pieces], dtype=np.int64),
            np.asarray([length for _, length, _ in pieces], dtype=np.int64),
            b"".join(digest for _, _, digest in pieces),
        )

    def pieces(self) -> list[Piece]:
        """Every written piece in file order: ``(file offset, length, digest)``."""
        plan = self.plan
        out: list[Piece] = []
        for index, digest in enumerate(self.digests):
            if plan.scan[index]:
                out += self.scanned.get(index, [])
            elif digest is not None:
                source = self.regions[plan.regions[index]]
                out.append((source.file_offset + plan.offsets[index], plan.lengths[index], digest))
        return out


def _coalesce(starts: npt.NDArray[np.int64], lengths: npt.NDArray[np.int64],
              regions: Sequence[RegionSource]) -> tuple[Extent, ...]:
    """Merge adjacent pieces (sorted file offsets) into extents, never across a region."""
    if starts.size == 0:
        return ()
    ends = starts + lengths
    boundaries = np.asarray([r.file_offset for r in regions], dtype=np.int64)
    new = np.concatenate(([True], (starts[1:] != ends[:-1]) | np.isin(starts[1:], boundaries)))
    first = np.flatnonzero(new)
    last = np.concatenate((first[1:] - 1, [starts.size - 1]))
    return tuple(
        Extent(s, e - s)
        for s, e in zip(starts[first].tolist(), ends[last].tolist(), strict=True)
    )


def build_manifest(
    write_result: WriteResult,
    regions: Sequence[RegionLayout],
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
