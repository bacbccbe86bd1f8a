"""A page source fed by a snapshot store, for the page server (lazy restore from a store).

The guest memory is staged in an anonymous, unreserved mapping of the memory
file's size (nothing is allocated until a chunk lands). A chunk is fetched
(local chunk cache first), checked against its address and decompressed into
that mapping before any of its bytes are handed to the page server; a block
(one manifest chunk of at most 2 MiB) is fetched once. ``start_streaming``
fetches every block in memory-file order with a bounded pool, ahead of the
page server's own background streaming; a demand fault on a block that is
not there yet fetches it at once in the faulting path.

It offers what :class:`squibd.uffd.server.PageServer` reads from a
:class:`squibd.uffd.source.PageSource`: ``page_size``, ``size``,
``layer_of_page`` (one layer: 0 for stored pages, ``HOLE`` for holes and zero
chunks), ``source_address``, ``read`` and ``close``. A chunk that is missing or
corrupt raises :class:`StoreChunkCorrupt` (a ``ChunkCorrupt``: the page server
stops and tells the VMM, naming the chunk and the snapshot).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Final

import numpy as np
import numpy.typing as npt

from squibd.snapshot.envelope import decode_state
from squibd.uffd.errors import ChunkCorrupt
from squibd.uffd.source import HOLE

from .errors import StoreError
from .store import ChunkRef, SnapshotStore, StoredSnapshot

__all__ = ["StoreChunkCorrupt", "StoreSource"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED: Final = ctypes.c_void_p(-1).value
_MAP_NORESERVE: Final = 0x4000
_NOT_FETCHED, _FETCHING, _FETCHED, _FAILED = 0, 1, 2, 3


class StoreChunkCorrupt(ChunkCorrupt):
    """A store chunk is missing or fails its address: the guest must not see it."""

    def __init__(self, snapshot: str, offset: int, length: int, message: str) -> None:
        Exception.__init__(self, message)
        self.path = f"store snapshot {snapshot!r}"
        self.offset = offset
        self.length = length


class StoreSource:
    """Guest memory of one stored snapshot, fetched on demand (see the module docs)."""

    def __init__(self, store: SnapshotStore, snap: StoredSnapshot, *, workers: int = 4) -> None:
        manifest = decode_state(snap.state).memory
        self.store = store
        self.snapshot = snap
        self.page_size: int = manifest.page_size
        self.chunk_size: int = manifest.chunk_size
        self.layer_of_page: npt.NDArray[np.int8] = np.full(
            snap.mem_size_bytes // self.page_size, HOLE, dtype=np.int8
        )
        self._blocks: dict[int, list[ChunkRef]] = {}
        for ref in snap.chunks:
            if ref.address:
                self.layer_of_page[ref.offset // self.page_size:
                                   (ref.offset + ref.length) // self.page_size] = 0
                self._blocks.setdefault(ref.offset // self.chunk_size, []).append(ref)
        self._status = np.zeros(max(1, -(-snap.mem_size_bytes // self.chunk_size)), np.int8)
        self._errors: dict[int, StoreChunkCorrupt] = {}
        self._cond = threading.Condition()
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="store-fetch")
        self.fetched_bytes = 0
        self._size = snap.mem_size_bytes
        base = _libc.mmap(None, max(self._size, 1), mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if base is None or base == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"cannot map {self._size} bytes for the store page source")
        self.base: int = base

    @property
    def size(self) -> int:
        """Bytes of guest memory."""
        return self._size

    def start_prefetch(self, offsets: Iterable[int]) -> None:
        """Fetch the blocks holding ``offsets`` now, in parallel (the pages needed first)."""
        blocks = dict.fromkeys(o // self.chunk_size for o in offsets)
        for block in blocks:
            if block in self._blocks:
                self._pool.submit(self._try_ensure, block)

    def start_streaming(self) -> None:
        """Fetch every block in the background, in memory-file order (bounded pool)."""
        for block in sorted(self._blocks):
            self._pool.submit(self._try_ensure, block)

    def _try_ensure(self, block: int) -> None:
        # A failure is recorded (corrupt) or undone (transient): a demand for that
        # block raises it or tries again.
        with contextlib.suppress(Exception):
            self._ensure(block)

    def _ensure(self, block: int) -> None:
        with self._cond:
            while True:
                status = self._status[block]
                if status == _FETCHED:
                    return
                if status == _FAILED:
                    raise self._errors[block]
                if status == _NOT_FETCHED:
                    self._status[block] = _FETCHING
                    break
                self._cond.wait()
        fetched: list[tuple[str, memoryview]] = []
        try:
            for ref in self._blocks.get(block, ()):
                data = self._fetch(ref, fetched)
                target = (ctypes.c_char * len(data)).from_address(self.base + ref.offset)
                memoryview(target).cast("B")[:] = data
                self.fetched_bytes += len(data)
        except StoreChunkCorrupt as exc:
            with self._cond:
                self._errors[block] = exc
                self._status[block] = _FAILED
                self._cond.notify_all()
            raise
        except BaseException:
            with self._cond:
                self._status[block] = _NOT_FETCHED
                self._cond.notify_all()
            raise
        with self._cond:
            self._status[block] = _FETCHED
            self._cond.notify_all()
        # into the local cache once the waiting fault has its bytes
        for address, stored in fetched:
            with contextlib.suppress(OSError):
                self.store.cache.put(address, stored)

    def _fetch(self, ref: ChunkRef, fetched: list[tuple[str, memoryview]]
               ) -> bytes | memoryview:
        try:
            return self.store.fetch_chunk(self.snapshot.name, ref, limit=False,
                                          fetched=fetched)
        except StoreError as exc:  # ChunkInvalid, StoreUnavailable
            raise StoreChunkCorrupt(self.snapshot.name, ref.offset, ref.length,
                                    f"store {self.store.name!r}: {exc}") from exc

    def _ensure_range(self, offset: int, length: int) -> None:
        for block in range(offset // self.chunk_size,
                           (offset + max(length, 1) - 1) // self.chunk_size + 1):
            if block in self._blocks:
                self._ensure(block)

    def source_address(self, layer: int, offset: int, length: int) -> int:
        """Address of verified bytes ``[offset, offset+length)`` (fetched first if needed)."""
        self._ensure_range(offset, length)
        return self.base + offset

    def read(self, offset: int, length: int) -> bytes:
        """Guest memory bytes at a memory-file offset (holes read as zeros), verified."""
        self._ensure_range(offset, length)
        return ctypes.string_at(self.base + offset, length)

    def close(self) -> None:
        """Stop fetching and unmap (idempotent)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.base:
            _libc.munmap(self.base, max(self._size, 1))
            self.base = 0
