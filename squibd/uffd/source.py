"""Where each page of guest memory comes from: the page server's memory sources.

``MemorySource`` is the interface the page server serves from (a
store-backed source plugs in here): a page size, a size, which *layer*
holds each page (``HOLE``: zeros), the address of verified bytes of a layer,
and ``read`` for the prefetcher. Two sources are built in:

- ``PageSource``: a squibd Full memory file and its Diffs, digest-checked;
- ``RawMemorySource``: a raw memory file without a manifest (Firecracker's),
  served as is (no digests exist to check).

``PageSource``: a chain is a Full memory file followed by zero or more
Diffs, in checkpoint order. The newest layer whose manifest extents cover a
page holds that page's content; a page no layer wrote is zero (a hole). The
chain is served as is, without rebasing: ``layer_of_page`` records, per host
page, the index of the layer to copy from (``HOLE`` for zero pages).

Every memory file is mapped read-only and private. Before any byte of a
layer is handed out, every digest chunk of that layer inside the same
chunk-size-aligned block is checked against the manifest (``ChunkCorrupt`` on
mismatch, naming the file and offset); a block is checked once.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Final, Protocol

import attrs
import numpy as np
import numpy.typing as npt

from squibd.snapshot.digest import digest_function, unit_digest
from squibd.snapshot.errors import Incompatible, MemoryIo
from squibd.snapshot.manifest import KIND_FULL, DigestUnit, MemoryManifest, iter_digest_units
from squibd.snapshot.pairing import PAIR_XATTR
from squibd.snapshot.paths import open_client_file
from squibd.snapshot.verify import check_pair_binding

from .errors import ChunkCorrupt, SnapshotMismatch

__all__ = ["HOLE", "PAIR_XATTR", "MemoryLayer", "MemorySource", "PageSource", "RawMemorySource"]

#: ``layer_of_page`` value of a page no layer wrote: served as zeros.
HOLE: Final = -1
#: Layers per chain at most (``layer_of_page`` is int8).
MAX_LAYERS: Final = 127

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
#: ``MAP_FAILED`` is ``(void *) -1``.
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


class MemorySource(Protocol):
    """What the page server serves from. Every method may be called from several
    threads at once (one per VMM served)."""

    @property
    def page_size(self) -> int:
        """Bytes per page (the host page size the memory was saved with)."""
        ...

    @property
    def size(self) -> int:
        """Bytes of guest memory, in memory-file order."""
        ...

    @property
    def layer_of_page(self) -> npt.NDArray[np.int8]:
        """Per page: ``HOLE`` (serve zeros) or the layer to pass to ``source_address``."""
        ...

    @property
    def verified(self) -> bool:
        """True when bytes are checked against digests before they are handed out."""
        ...

    def source_address(self, layer: int, offset: int, length: int) -> int:
        """Address in this process of the (verified) bytes ``[offset, offset+length)`` of
        ``layer``, valid until ``close``.

        Raises:
            ChunkCorrupt: the bytes fail their digest.
        """
        ...

    def read(self, offset: int, length: int) -> bytes:
        """Guest memory bytes at a memory-file offset (verified, holes as zeros)."""
        ...

    def close(self) -> None:
        """Release the source (after every connection is done with it)."""
        ...


def _map_readonly(path: str, fd: int, size: int) -> int:
    base = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
    if base is None or base == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of {path!r}: {os.strerror(err)}")
    return int(base)


def _check_pair(path: str, fd: int, manifest: MemoryManifest) -> None:
    # The one pair check (size, xattr, or every digest when the xattr is gone),
    # reported in the page server's own kind.
    try:
        check_pair_binding(fd, manifest, path=path)
    except (MemoryIo, Incompatible) as error:
        raise SnapshotMismatch(str(error)) from error


@attrs.define(eq=False)
class MemoryLayer:
    """One memory file of the chain, mapped read-only, with lazy digest checks."""

    path: str
    manifest: MemoryManifest
    base: int
    size: int
    #: chunk-aligned block index -> the digest units inside that block.
    _chunks: dict[int, list[DigestUnit]]
    _verified: set[int] = attrs.Factory(set)
    #: Serialises digest checks, so connections never check the same block twice.
    _lock: threading.Lock = attrs.Factory(threading.Lock)

    @classmethod
    def open(cls, path: str, manifest: MemoryManifest) -> MemoryLayer:
        """Map ``path`` (checked against ``manifest``: size and pair xattr).

        Raises:
            SnapshotMismatch: the file does not belong to the manifest.
            InvalidPath: the path is a symlink, FIFO, directory, ... (not a regular file).
            OSError: the file cannot be opened or mapped.
        """
        fd = open_client_file(path, "memory file")  # no symlink, FIFO, directory, ...
        try:
            _check_pair(path, fd, manifest)
            base = _map_readonly(path, fd, manifest.file_size)
        finally:
            os.close(fd)
        chunks: dict[int, list[DigestUnit]] = {}
        for unit in iter_digest_units(manifest):
            chunks.setdefault(unit.offset // manifest.chunk_size, []).append(unit)
        count = sum(len(v) for v in chunks.values())
        if count * manifest.digest_size != len(manifest.digests):
            _libc.munmap(base, manifest.file_size)
            raise SnapshotMismatch(
                f"the manifest of {path!r} lists {len(manifest.digests)} digest bytes "
                f"for {count} chunks"
            )
        return cls(path, manifest, base, manifest.file_size, chunks)

    def view(self, offset: int, length: int) -> memoryview:
        """A read-only view of ``[offset, offset+length)`` of the file (unchecked)."""
        return memoryview((ctypes.c_char * length).from_address(self.base + offset)).cast("B")

    def verify_range(self, offset: int, length: int) -> None:
        """Check every chunk in the blocks touching ``[offset, offset+length)`` (once each).

        Raises:
            ChunkCorrupt: a chunk's digest differs from the manifest.
        """
        chunk_size = self.manifest.chunk_size
        for block in range(offset // chunk_size, (offset + length - 1) // chunk_size + 1):
            if block not in self._verified:
                with self._lock:
                    if block not in self._verified:
                        self._verify_block(block)

    def _verify_block(self, block: int) -> None:
        function = digest_function(self.manifest.digest_algorithm)
        for unit in self._chunks.get(block, ()):
            pieces = [self.view(offset, length) for offset, length in unit.pieces]
            if unit_digest(function, pieces, unit.combined) != unit.digest:
                raise ChunkCorrupt(self.path, unit.offset, unit.end - unit.offset)
        self._verified.add(block)

    def close(self) -> None:
        """Unmap the file (idempotent)."""
        if self.base:
            _libc.munmap(self.base, self.size)
            self.base = 0


@attrs.define(eq=False)
class PageSource:
    """A Full memory file and its Diffs, served page by page (newest version wins)."""

    layers: tuple[MemoryLayer, ...]
    page_size: int
    layer_of_page: npt.NDArray[np.int8]
    verified: bool = True

    @classmethod
    def open(cls, chain: Sequence[tuple[str, MemoryManifest]]) -> PageSource:
        """Open a chain of ``(memory file, manifest)``: a Full, then its Diffs in order.

        Raises:
            SnapshotMismatch: the chain is not Full + Diffs of one another, or a file
                does not match its manifest.
        """
        if not chain:
            raise SnapshotMismatch("no memory file given")
        if not 0 < len(chain) <= MAX_LAYERS:
            raise SnapshotMismatch(f"a chain holds at most {MAX_LAYERS} memory files")
        first = chain[0][1]
        if first.kind != KIND_FULL:
            raise SnapshotMismatch(f"{chain[0][0]!r} is a {first.kind} snapshot; the chain "
                                   "must start with a Full one")
        page = first.page_size
        for (path, manifest), (_, parent) in zip(chain[1:], chain, strict=False):
            if manifest.parent_pair_id != parent.pair_id:
                raise SnapshotMismatch(
                    f"{path!r} applies to pair {manifest.parent_pair_id}, not to the "
                    f"previous snapshot of the chain ({parent.pair_id})"
                )
            if manifest.regions != first.regions or manifest.page_size != page:
                raise SnapshotMismatch(f"{path!r} has another memory layout than the Full")
        layer_of_page = np.full(first.file_size // page, HOLE, dtype=np.int8)
        layers: list[MemoryLayer] = []
        try:
            for index, (path, manifest) in enumerate(chain):
                layers.append(MemoryLayer.open(path, manifest))
                for extent in manifest.extents:
                    if extent.offset % page or extent.length % page:
                        raise SnapshotMismatch(
                            f"{path!r}: extent at {extent.offset:#x} is not page aligned"
                        )
                    layer_of_page[extent.offset // page : extent.end // page] = index
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(tuple(layers), page, layer_of_page)

    @property
    def size(self) -> int:
        """Bytes of guest memory (the memory file's size)."""
        return len(self.layer_of_page) * self.page_size

    def runs(self, first_page: int, count: int) -> Iterator[tuple[int, int, int]]:
        """Cut ``count`` pages from ``first_page`` into ``(first, count, layer)`` runs."""
        end = first_page + count
        owners = self.layer_of_page
        while first_page < end:
            layer = int(owners[first_page])
            stop = first_page + 1
            while stop < end and owners[stop] == layer:
                stop += 1
            yield first_page, stop - first_page, layer
            first_page = stop

    def source_address(self, layer: int, offset: int, length: int) -> int:
        """Address of verified bytes ``[offset, offset+length)`` of ``layer`` in this process.

        Raises:
            ChunkCorrupt: the data fails its digest.
        """
        source = self.layers[layer]
        source.verify_range(offset, length)
        return source.base + offset

    def read(self, offset: int, length: int) -> bytes:
        """Guest memory bytes at a memory-file offset, newest version, verified."""
        out = bytearray()
        page = self.page_size
        first = offset // page
        last = (offset + length - 1) // page
        for run_first, run_count, layer in self.runs(first, last - first + 1):
            start = max(offset, run_first * page)
            stop = min(offset + length, (run_first + run_count) * page)
            if layer == HOLE:
                out += bytes(stop - start)
            else:
                address = self.source_address(layer, start, stop - start)
                out += ctypes.string_at(address, stop - start)
        return bytes(out)

    def close(self) -> None:
        """Unmap every layer."""
        for layer in self.layers:
            layer.close()


@attrs.define(eq=False)
class RawMemorySource:
    """A raw memory file without a manifest (a Firecracker-made pair): one layer,
    every page served as the file holds it; holes of a sparse file are zero pages.
    Nothing can be verified (``verified`` is False)."""

    path: str
    page_size: int
    layer_of_page: npt.NDArray[np.int8]
    base: int
    verified: bool = False

    @classmethod
    def open(cls, path: str, *, page_size: int) -> RawMemorySource:
        """Map ``path`` read-only; its size must be a non-zero multiple of ``page_size``.

        Raises:
            SnapshotMismatch: the file is empty or not a whole number of pages.
            OSError: the file cannot be opened or mapped.
        """
        fd = open_client_file(path, "memory file")  # no symlink, FIFO, directory, ...
        try:
            size = os.fstat(fd).st_size
            if size == 0 or size % page_size:
                raise SnapshotMismatch(
                    f"memory file {path!r} is {size} bytes: not a whole number of "
                    f"{page_size}-byte pages"
                )
            layer_of_page = _data_pages(fd, size, page_size)
            base = _map_readonly(path, fd, size)
        finally:
            os.close(fd)
        return cls(path, page_size, layer_of_page, base)

    @property
    def size(self) -> int:
        """Bytes of guest memory (the memory file's size)."""
        return len(self.layer_of_page) * self.page_size

    def source_address(self, layer: int, offset: int, length: int) -> int:
        """Address of bytes ``[offset, offset+length)`` of the file (nothing to verify)."""
        del layer, length
        return self.base + offset

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the file at ``offset`` (holes read as zeros)."""
        return ctypes.string_at(self.base + offset, length)

    def close(self) -> None:
        """Unmap the file (idempotent)."""
        if self.base:
            _libc.munmap(self.base, self.size)
            self.base = 0


def _data_pages(fd: int, size: int, page_size: int) -> npt.NDArray[np.int8]:
    """0 for pages holding data, ``HOLE`` for pages of the file's holes (SEEK_DATA)."""
    pages = np.full(size // page_size, HOLE, dtype=np.int8)
    offset = 0
    while offset < size:
        try:
            data = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # no data after offset
            if exc.errno == errno.EINVAL:  # no SEEK_DATA on this filesystem: all data
                pages[:] = 0
                break
            raise
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        pages[data // page_size : (hole + page_size - 1) // page_size] = 0
        offset = hole
    return pages
