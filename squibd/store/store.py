"""A snapshot store: push, list, pull, delete and gc of deduplicated snapshots.

Layout under the store's root (bucket prefix or directory)::

    chunks/AB/<address>        a chunk (chunks.py), address = BLAKE3 of its bytes
    snapshots/<name>.squib     the snapshot object: state file + chunk list (written last)
    pairs/<pair_id>            the name holding that pair (to find a Diff's parent)
    leases/<id>                a push in progress: the addresses it references
    gc/<id>                    a gc run: its start (and end once finished)

The snapshot object is a MessagePack map followed by the BLAKE3 digest of
that map. Its chunk list is ``[[offset, length, address], ...]`` of the
memory file, an empty address for an all-zero chunk; a hole is simply not
listed. Every snapshot in the store is self-contained: a Diff is merged onto
its parent's chunks at push time (its state file rewritten as the Full at
that checkpoint), so pull and restore never walk a chain.

Concurrent push and gc: a push uploads its chunks, writes its lease (the
addresses it needs), then looks for gc runs that started before the lease
and overlapped the push; it waits for those to end and re-checks (re-uploads)
its chunks before writing the snapshot object. A gc lists leases before
snapshots and keeps every leased address; so no gc ever deletes a chunk
that a snapshot written after it relies on. A killed push leaves only
unreferenced chunks (and a lease that expires: at once when its process is
gone on this host, after ``LEASE_TTL_S`` elsewhere).
"""

from __future__ import annotations

import bisect
import builtins
import contextlib
import datetime
import json
import mmap
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final

import attrs
import blake3
import msgpack

from squibd.snapshot.describe import default_memory_path
from squibd.snapshot.digest import digest_function
from squibd.snapshot.envelope import decode_state, encode_state, read_state_file
from squibd.snapshot.manifest import KIND_DIFF, KIND_FULL, Extent, MemoryManifest, iter_chunks
from squibd.snapshot.pairing import read_pair_xattr, set_pair_xattr

from .chunks import (
    ChunkCache,
    address_of,
    chunk_key,
    decode_chunk,
    encode_chunk,
    encode_framed,
    is_zero,
)
from .config import StoreConfig, check_name, check_prefix, default_cache_dir
from .errors import (
    ChunkInvalid,
    InvalidStoreName,
    ParentNotInStore,
    StoreError,
    StoreSnapshotNotFound,
    StoreUnavailable,
)
from .objects import FileObjects, Objects, S3Objects, open_objects

__all__ = [
    "ChunkRef",
    "GcResult",
    "PullResult",
    "PushResult",
    "SnapshotStore",
    "StoredSnapshot",
]

FORMAT: Final = 1
LEASE_TTL_S: Final = 3600.0
GC_STALE_S: Final = 3600.0
_GC_RECORD_KEEP_S: Final = 86400.0
_GC_WAIT_S: Final = 600.0
_SUFFIX: Final = ".squib"
_DIGEST: Final = 32
#: progress(done_bytes, total_bytes), from worker threads, throttled.
Progress = Callable[[int, int], None]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _pid_start(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@attrs.frozen
class ChunkRef:
    """One chunk of a stored snapshot's memory: where it goes and its address ('' = zeros)."""

    offset: int
    length: int
    address: str


@attrs.frozen
class StoredSnapshot:
    """A snapshot object as read from the store."""

    name: str
    pair_id: str
    parent_pair_id: str | None
    snapshot_type: str
    vm_id: str | None
    created_at: str
    mem_size_bytes: int
    state: bytes
    chunks: tuple[ChunkRef, ...]
    #: Memory-file offsets of the pages the vCPUs touch first, found at push time
    #: (a lazy restore fetches their chunks at once, in parallel); () when unknown.
    prefetch: tuple[int, ...] = ()

    def listing(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pair_id": self.pair_id,
            "parent_pair_id": self.parent_pair_id,
            "snapshot_type": self.snapshot_type,
            "vm_id": self.vm_id,
            "created_at": self.created_at,
            "mem_size_bytes": self.mem_size_bytes,
        }


@attrs.frozen
class PushResult:
    """What ``push`` uploaded (also ``store.push``'s wire result)."""

    name: str
    pair_id: str
    chunks_total: int
    chunks_uploaded: int
    bytes_uploaded: int
    duration_ms: float


@attrs.frozen
class PullResult:
    """The local pair ``pull`` committed (also ``store.pull``'s wire result)."""

    name: str
    pair_id: str
    snapshot_path: str
    mem_file_path: str
    chunks_fetched: int
    bytes_fetched: int
    duration_ms: float


@attrs.frozen
class GcResult:
    chunks_deleted: int
    bytes_freed: int


@attrs.frozen
class _Planned:
    """One chunk a push will reference: from the memory file, merged bytes, or the parent's."""

    offset: int
    length: int
    data: bytes | None = None
    address: str | None = None
    digest: bytes | None = None


class _Throttle:
    """Thread-safe byte counter calling ``progress`` at most every 1/64 of the total.

    ``progress`` must be quick (it runs under the counter's lock); the figures it
    receives never go back.
    """

    def __init__(self, progress: Progress | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self._next = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        if self.progress is None:
            return
        with self._lock:
            self.done += n
            if self.done < self._next and self.done < self.total:
                return
            self._next = self.done + max(1, self.total // 64)
            # Reported under the lock, so reports leave in the order of their figures.
            self.progress(self.done, self.total)


class SnapshotStore:
    """One configured store (thread-safe; every method blocks: call it from a worker thread)."""

    def __init__(self, name: str, config: StoreConfig, objects: Objects | None = None) -> None:
        self.name = name
        self.config = config
        self.objects: Objects = objects if objects is not None else open_objects(config)
        self.cache_dir = config.cache_dir or default_cache_dir(name)
        self.cache = ChunkCache(self.cache_dir)
        self.workers = config.max_requests
        self._push_lock = threading.Lock()
        #: Chunk uploads/downloads in flight at most (max_requests); hashing, HEADs,
        #: (de)compression and file writes of other chunks go on around them.
        self._transfers = threading.BoundedSemaphore(self.workers)
        self._mem = memoryview(b"")

    # --- snapshot objects -------------------------------------------------------------
    @staticmethod
    def _snapshot_key(name: str) -> str:
        return f"snapshots/{name}{_SUFFIX}"

    def get_snapshot_raw(self, name: str) -> bytes:
        """The snapshot object's bytes (checked by :meth:`parse`).

        Raises:
            StoreSnapshotNotFound, InvalidStoreName, StoreUnavailable.
        """
        check_name(name)
        raw = self.objects.get(self._snapshot_key(name))
        if raw is None:
            raise StoreSnapshotNotFound(self.name, name)
        return raw

    def parse(self, name: str, raw: bytes) -> StoredSnapshot:
        """Check and decode a snapshot object (StoreError when damaged)."""
        return self._parse(name, raw)

    def get_snapshot(self, name: str) -> StoredSnapshot:
        """Read and check snapshot ``name``.

        Raises:
            StoreSnapshotNotFound, StoreError (damaged object), StoreUnavailable.
        """
        check_name(name)
        raw = self.objects.get(self._snapshot_key(name))
        if raw is None:
            raise StoreSnapshotNotFound(self.name, name)
        return self._parse(name, raw)

    def _parse(self, name: str, raw: bytes) -> StoredSnapshot:
        body, digest = raw[:-_DIGEST], raw[-_DIGEST:]
        if len(raw) <= _DIGEST or blake3.blake3(body).digest() != digest:
            raise StoreError(f"the snapshot object of {name!r} in store {self.name!r} is damaged")
        try:
            data = msgpack.unpackb(body, raw=False)
            if data["format"] != FORMAT:
                raise StoreError(f"snapshot {name!r} has store format {data['format']}, "
                                 f"this squibd reads {FORMAT}")
            return StoredSnapshot(
                name=data["name"],
                pair_id=data["pair_id"],
                parent_pair_id=data["parent_pair_id"],
                snapshot_type=data["snapshot_type"],
                vm_id=data["vm_id"],
                created_at=data["created_at"],
                mem_size_bytes=data["mem_size_bytes"],
                state=data["state"],
                chunks=tuple(ChunkRef(o, n, a) for o, n, a in data["chunks"]),
                prefetch=tuple(int(o) for o in data.get("prefetch", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the snapshot object of {name!r} is malformed: {exc}") from exc

    @staticmethod
    def _serialize(snap: StoredSnapshot) -> bytes:
        body: bytes = msgpack.packb(
            {
                "format": FORMAT,
                **snap.listing(),
                "state": snap.state,
                "chunks": [[c.offset, c.length, c.address] for c in snap.chunks],
                "prefetch": list(snap.prefetch),
            },
            use_bin_type=True,
        )
        return body + blake3.blake3(body).digest()

    def list(self, prefix: str = "") -> list[dict[str, Any]]:
        """Every complete snapshot whose name starts with ``prefix``, sorted by name."""
        check_prefix(prefix)
        keys = [
            info.key for info in self.objects.list(f"snapshots/{prefix}")
            if info.key.endswith(_SUFFIX)
        ]
        out: list[dict[str, Any]] = []
        with ThreadPoolExecutor(self.workers) as pool:
            for key, raw in zip(keys, pool.map(self.objects.get, keys), strict=True):
                if raw is None:
                    continue  # deleted meanwhile
                name = key[len("snapshots/"): -len(_SUFFIX)]
                out.append(self._parse(name, raw).listing())
        return sorted(out, key=lambda s: str(s["name"]))

    def delete(self, name: str) -> None:
        """Remove snapshot ``name`` (its chunks stay until gc)."""
        snap = self.get_snapshot(name)
        self.objects.delete(self._snapshot_key(name))
        pointer = self.objects.get(f"pairs/{snap.pair_id}")
        if pointer is not None and pointer.decode(errors="replace") == name:
            self.objects.delete(f"pairs/{snap.pair_id}")

    # --- chunks ---------------------------------------------------------------------------
    def fetch_chunk(self, snapshot: str, ref: ChunkRef, *, cache: bool = True,
                    limit: bool = True,
                    fetched: builtins.list[tuple[str, memoryview]] | None = None,
                    ) -> bytes | memoryview:
        """The verified bytes of ``ref`` (local cache first, then the store).

        ``cache=False``: a chunk fetched from the store is not kept in the local cache
        (a pull writes it into the memory file anyway). ``limit=False``: not counted
        against ``max_requests`` (a lazy VM's demand fault must not queue behind
        background fetches; the page source bounds its own). ``fetched``: a chunk
        fetched from the store is appended as ``(address, stored form)`` instead of
        being written to the cache here (the caller writes it off its critical path).

        Raises:
            ChunkInvalid: missing from the store, or not matching its address.
        """
        if not ref.address:
            return bytes(ref.length)
        cached = self.cache.get(ref.address)
        if cached is not None:
            data = decode_chunk(cached, ref.length)
            if data is not None and address_of(data) == ref.address:
                return data
            self.cache.drop(ref.address)
        with self._transfers if limit else contextlib.nullcontext():
            stored = self.objects.get_buffer(chunk_key(ref.address))
        if stored is None:
            raise ChunkInvalid(snapshot, ref.address, ref.offset, "is missing from the store")
        data = decode_chunk(stored, ref.length)
        if data is None or address_of(data) != ref.address:
            raise ChunkInvalid(snapshot, ref.address, ref.offset,
                               "does not match its address (corrupt in the store)")
        if fetched is not None:
            fetched.append((ref.address, stored))
        elif cache:
            with contextlib.suppress(OSError):
                self.cache.put(ref.address, stored)
        return data

    # --- push -------------------------------------------------------------------------------
    def push(
        self,
        snapshot_path: str,
        name: str,
        *,
        vm_id: str | None = None,
        progress: Progress | None = None,
        chunk_hook: Callable[[int], None] | None = None,
    ) -> PushResult:
        """Upload the committed local pair at ``snapshot_path`` as ``name``.

        ``chunk_hook(i)`` runs after the i-th chunk is handled (tests use it to kill
        a push part-way).

        Raises:
            InvalidStoreName, SnapshotError (bad local pair), ParentNotInStore,
            ChunkInvalid (a parent chunk), StoreUnavailable.
        """
        check_name(name)
        started = time.monotonic()
        push_start = time.time()
        with open(snapshot_path, "rb") as f:
            state_bytes = f.read()
        state = read_state_file(snapshot_path)
        manifest = state.memory
        mem_path = default_memory_path(snapshot_path)
        fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size != manifest.file_size:
                raise StoreError(f"memory file {mem_path!r} is {size} bytes, its manifest "
                                 f"says {manifest.file_size}")
            pair = read_pair_xattr(fd)
            if pair is not None and pair != manifest.pair_id:
                raise StoreError(f"memory file {mem_path!r} belongs to pair {pair}, "
                                 f"{snapshot_path!r} to {manifest.pair_id}")
            view = mmap.mmap(fd, size, prot=mmap.PROT_READ) if size else None
        finally:
            os.close(fd)
        with self._push_lock:
            try:
                self._mem = memoryview(view) if view is not None else memoryview(b"")
                if manifest.kind == KIND_DIFF:
                    plan, state_bytes = self._merge_diff(name, state)
                else:
                    plan = [_Planned(c.offset, c.length) for c in
                            iter_chunks(manifest.extents, manifest.chunk_size)]
                refs, uploaded, bytes_up = self._upload(plan, progress, chunk_hook)
                prefetch = self._first_touched(name, state, plan)
                snap = StoredSnapshot(
                    name=name,
                    pair_id=manifest.pair_id,
                    parent_pair_id=manifest.parent_pair_id,
                    snapshot_type=manifest.kind,
                    vm_id=vm_id,
                    created_at=datetime.datetime.now(datetime.UTC).isoformat(
                        timespec="milliseconds"),
                    mem_size_bytes=manifest.file_size,
                    state=state_bytes,
                    chunks=tuple(refs),
                    prefetch=tuple(prefetch),
                )
                self._commit(snap, push_start, plan)
            finally:
                self._mem.release()
                self._mem = memoryview(b"")
                if view is not None:
                    # A failed worker's traceback may still hold a slice: then the
                    # mapping goes with the garbage collector.
                    with contextlib.suppress(BufferError):
                        view.close()
        return PushResult(
            name=name,
            pair_id=manifest.pair_id,
            chunks_total=len(refs),
            chunks_uploaded=uploaded,
            bytes_uploaded=bytes_up,
            duration_ms=round((time.monotonic() - started) * 1000.0, 3),
        )

    def _first_touched(self, name: str, state: Any, plan: Sequence[_Planned]) -> builtins.list[int]:
        """The offsets of the pages the vCPUs touch first (a heuristic: [] when unsure)."""
        from squibd.uffd.prefetch import prefetch_offsets

        starts = [item.offset for item in plan]
        mem = self._mem

        def piece(offset: int, length: int) -> bytes:
            index = bisect.bisect_right(starts, offset) - 1
            if index < 0 or offset >= plan[index].offset + plan[index].length:
                if index + 1 < len(starts):
                    length = min(length, starts[index + 1] - offset)
                return bytes(length)  # a hole
            item = plan[index]
            length = min(length, item.offset + item.length - offset)
            at = offset - item.offset
            if item.data is not None:
                return item.data[at: at + length]
            if item.address is None:
                return bytes(mem[offset: offset + length])
            if not item.address:
                return bytes(length)
            data = self.fetch_chunk(name, ChunkRef(item.offset, item.length, item.address))
            return bytes(data[at: at + length])

        def read(offset: int, length: int) -> bytes:
            out = bytearray()
            while len(out) < length:
                part = piece(offset + len(out), length - len(out))
                if not part:
                    break
                out += part
            return bytes(out)

        try:
            memory: MemoryManifest = state.memory
            return prefetch_offsets(state.vcpu_states, memory.regions, read, memory.page_size)
        except (StoreError, ValueError, IndexError, struct.error):
            return []

    def _merge_diff(self, name: str, state: Any) -> tuple[builtins.list[_Planned], bytes]:
        """A Diff's chunk plan merged onto its parent's chunks, and its Full state file."""
        manifest: MemoryManifest = state.memory
        pointer = self.objects.get(f"pairs/{manifest.parent_pair_id}")
        if pointer is None:
            raise ParentNotInStore(
                f"{name!r} is a Diff of pair {manifest.parent_pair_id}, which store "
                f"{self.name!r} does not hold: push that snapshot first"
            )
        parent_name = pointer.decode()
        parent = self.get_snapshot(parent_name)
        if parent.pair_id != manifest.parent_pair_id:
            raise ParentNotInStore(f"store {self.name!r} lost the snapshot of pair "
                                   f"{manifest.parent_pair_id}")
        parent_manifest = decode_state(parent.state).memory
        size = parent_manifest.digest_size
        parent_digests = {
            piece.offset: parent_manifest.digests[i * size: (i + 1) * size]
            for i, piece in enumerate(iter_chunks(parent_manifest.extents, manifest.chunk_size))
        }
        cs = manifest.chunk_size
        by_block: dict[int, list[ChunkRef]] = {}
        for ref in parent.chunks:
            by_block.setdefault(ref.offset // cs, []).append(ref)
        touched: dict[int, list[Extent]] = {}
        for piece in iter_chunks(manifest.extents, cs):
            touched.setdefault(piece.offset // cs, []).append(piece)
        fn = digest_function(manifest.digest_algorithm)
        plan: list[_Planned] = []
        for block in sorted(set(by_block) | set(touched)):
            if block not in touched:
                plan.extend(_Planned(r.offset, r.length, address=r.address,
                                     digest=parent_digests.get(r.offset))
                            for r in by_block[block])
                continue
            start = block * cs
            length = min(cs, manifest.file_size - start)
            merged = bytearray(length)
            for ref in by_block.get(block, ()):
                merged[ref.offset - start: ref.offset - start + ref.length] = (
                    self.fetch_chunk(parent_name, ref)
                )
            for piece in touched[block]:
                merged[piece.offset - start: piece.end - start] = self._mem[
                    piece.offset: piece.end]
            plan.append(_Planned(start, length, data=bytes(merged), digest=fn(merged)))
        # The state file of the Full at this checkpoint: same pair id, every chunk listed.
        extents: list[Extent] = []
        digests = bytearray()
        for item in plan:
            if item.digest is None or len(item.digest) != manifest.digest_size:
                raise StoreError(f"the parent {parent_name!r} of {name!r} lists a chunk at "
                                 f"{item.offset:#x} its state file does not")
            digests += item.digest
            if extents and extents[-1].end == item.offset:
                extents[-1] = Extent(extents[-1].offset, extents[-1].length + item.length)
            else:
                extents.append(Extent(item.offset, item.length))
        full = attrs.evolve(manifest, kind=KIND_FULL, parent_pair_id=None,
                            extents=tuple(extents), digests=bytes(digests))
        return plan, encode_state(attrs.evolve(state, memory=full))

    def _upload(
        self,
        plan: Sequence[_Planned],
        progress: Progress | None,
        chunk_hook: Callable[[int], None] | None,
    ) -> tuple[builtins.list[ChunkRef], int, int]:
        """Hash, skip zeros and known chunks, compress and upload the rest, in parallel."""
        total = sum(item.length for item in plan)
        meter = _Throttle(progress, total)
        counter = iter(range(len(plan)))
        lock = threading.Lock()
        mem = self._mem
        known = self._known_chunks(len(plan))
        # Each worker thread reuses one buffer: a fresh 2 MiB allocation per chunk costs
        # its zero fill and page faults, about as much CPU as hashing the chunk. The
        # client library does not keep a reference once a PUT has returned.
        local = threading.local()

        def buffer(length: int) -> bytearray:
            framed: bytearray | None = getattr(local, "framed", None)
            if framed is None or len(framed) != 1 + length:
                framed = local.framed = bytearray(1 + length)
            return framed

        def one(item: _Planned) -> tuple[ChunkRef, int]:
            offset, length = item.offset, item.length
            sent = 0
            if item.address is not None:  # a parent chunk, unchanged
                ref = ChunkRef(offset, length, item.address)
            else:
                # one copy, into a buffer with room for the stored form's header byte
                framed = buffer(length)
                view = memoryview(framed)[1:]
                view[:] = mem[offset: offset + length] if item.data is None else item.data
                if is_zero(view):
                    ref = ChunkRef(offset, length, "")
                else:
                    address = address_of(view)
                    ref = ChunkRef(offset, length, address)
                    key = chunk_key(address)
                    present = (address in known if known is not None
                               else self.objects.exists(key))
                    if not present:
                        stored = encode_framed(framed)
                        with self._transfers:
                            self.objects.put(key, stored)
                        sent = len(stored)
                view.release()
            meter.add(length)
            if chunk_hook is not None:
                with lock:
                    index = next(counter)
                chunk_hook(index)
            return ref, sent

        with ThreadPoolExecutor(2 * self.workers) as pool:
            done = list(pool.map(one, plan))
        refs = [ref for ref, _ in done]
        uploaded = sum(1 for _, sent in done if sent)
        return refs, uploaded, sum(sent for _, sent in done)

    def _known_chunks(self, wanted: int) -> set[str] | None:
        """The store's chunk addresses by listing, when that is cheaper than a HEAD each.

        A listing page holds 1000 keys: a store holding at most ten times the chunks
        a push checks is listed (a few requests instead of one per chunk); a bigger
        one is not (None: ask per chunk).
        """
        limit = max(1000, 10 * wanted)
        known: set[str] = set()
        for info in self.objects.list("chunks/"):
            known.add(info.key.rsplit("/", 1)[-1])
            if len(known) > limit:
                return None
        return known

    def _commit(self, snap: StoredSnapshot, push_start: float, plan: Sequence[_Planned]) -> None:
        """Lease, settle with concurrent gc runs, then write the snapshot object last."""
        lease_key = f"leases/{uuid.uuid4()}"
        addresses = sorted({c.address for c in snap.chunks if c.address})
        lease_time = time.time()
        self.objects.put(lease_key, json.dumps({
            "boot_id": _boot_id(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
            "time": lease_time, "addresses": addresses,
        }).encode())
        try:
            if self._wait_for_gc(push_start, lease_time):
                self._recheck(snap, plan)
            self.objects.put(self._snapshot_key(snap.name), self._serialize(snap))
            self.objects.put(f"pairs/{snap.pair_id}", snap.name.encode())
        finally:
            self.objects.delete(lease_key)

    def _wait_for_gc(self, push_start: float, lease_time: float) -> bool:
        """Wait for gc runs that began before our lease and overlapped the push.

        Returns whether there was any (the push's chunks must then be re-checked).
        """
        deadline = time.monotonic() + _GC_WAIT_S
        seen = False
        while True:
            running = False
            for info in self.objects.list("gc/"):
                record = self._gc_record(info.key)
                if record is None or record["start"] > lease_time:
                    continue
                end = record.get("end")
                if end is not None and end < push_start:
                    continue
                seen = True
                if end is None and not self._stale(record, info.mtime, GC_STALE_S):
                    running = True
            if not running:
                return seen
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"a gc of store {self.name!r} has run for more than "
                                       f"{_GC_WAIT_S:.0f} s; push retried later")
            time.sleep(0.1)  # polling another host's gc run in the store

    def _recheck(self, snap: StoredSnapshot, plan: Sequence[_Planned]) -> None:
        """Upload again any chunk of ``snap`` that a concurrent gc removed."""
        first: dict[str, int] = {}
        for index, ref in enumerate(snap.chunks):
            if ref.address:
                first.setdefault(ref.address, index)

        def one(address: str) -> None:
            if self.objects.exists(chunk_key(address)):
                return
            item = plan[first[address]]
            if item.address is not None:
                raise StoreUnavailable(
                    f"a concurrent gc of store {self.name!r} removed chunk {address} of the "
                    f"parent of {snap.name!r}; push the parent again"
                )
            ref = snap.chunks[first[address]]
            data = (self._mem[ref.offset: ref.offset + ref.length] if item.data is None
                    else memoryview(item.data))
            self.objects.put(chunk_key(address), encode_chunk(data))

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(one, first))

    def _gc_record(self, key: str) -> dict[str, Any] | None:
        raw = self.objects.get(key)
        if raw is None:
            return None
        try:
            record: dict[str, Any] = json.loads(raw)
        except ValueError:
            return None
        return record

    @staticmethod
    def _stale(record: dict[str, Any], mtime: float, ttl: float) -> bool:
        """A lease or gc run whose process is gone (this host) or that is older than ttl."""
        if record.get("boot_id") == _boot_id():
            pid = record.get("pid")
            if isinstance(pid, int) and _pid_start(pid) != record.get("pid_start"):
                return True
        return time.time() - mtime > ttl

    # --- pull ---------------------------------------------------------------------------
    def materialize(
        self,
        name: str,
        mem_fd: int,
        *,
        snap: StoredSnapshot | None = None,
        progress: Progress | None = None,
    ) -> tuple[StoredSnapshot, int, int]:
        """Write snapshot ``name``'s memory into ``mem_fd`` (sized, holes left as holes).

        Returns ``(snapshot, chunks fetched, bytes)``.
        """
        snap = snap or self.get_snapshot(name)
        os.ftruncate(mem_fd, snap.mem_size_bytes)
        refs = [r for r in snap.chunks if r.address]
        meter = _Throttle(progress, sum(r.length for r in refs))

        def one(ref: ChunkRef) -> int:
            data = memoryview(self.fetch_chunk(name, ref, cache=False))
            written = 0
            while written < len(data):
                written += os.pwrite(mem_fd, data[written:], ref.offset + written)
            meter.add(ref.length)
            return ref.length

        with ThreadPoolExecutor(2 * self.workers) as pool:
            total = sum(pool.map(one, refs))
        return snap, len(refs), total

    def pull(
        self,
        name: str,
        snapshot_path: str,
        mem_file_path: str,
        *,
        progress: Progress | None = None,
        allowed_roots: Sequence[str] | None = None,
    ) -> PullResult:
        """Materialise ``name`` as a committed local pair (a Diff comes down as its Full)."""
        from squibd.snapshot.commit import PairTransaction

        started = time.monotonic()
        snap = self.get_snapshot(name)
        decode_state(snap.state)  # refuse a bad state file before writing anything
        with PairTransaction(snapshot_path, mem_file_path, allowed_roots=allowed_roots) as txn:
            _, count, total = self.materialize(name, txn.mem_fd, snap=snap, progress=progress)
            set_pair_xattr(txn.mem_fd, snap.pair_id)
            txn.commit(snap.state, mem_size=snap.mem_size_bytes)
        return PullResult(
            name=name,
            pair_id=snap.pair_id,
            snapshot_path=snapshot_path,
            mem_file_path=mem_file_path,
            chunks_fetched=count,
            bytes_fetched=total,
            duration_ms=round((time.monotonic() - started) * 1000.0, 3),
        )

    # --- gc ---------------------------------------------------------------------------------
    def gc(self, grace_s: float = 3600.0) -> GcResult:
        """Delete chunks no snapshot (nor running push) references, older than ``grace_s``."""
        if grace_s < 0:
            raise InvalidStoreName(f"grace_s must be >= 0, got {grace_s}")
        record_key = f"gc/{uuid.uuid4()}"
        record: dict[str, Any] = {"start": time.time(), "boot_id": _boot_id(),
                                  "pid": os.getpid(), "pid_start": _pid_start(os.getpid())}
        self.objects.put(record_key, json.dumps(record).encode())
        try:
            keep: set[str] = set()
            for info in list(self.objects.list("leases/")):
                lease = self._gc_record(info.key)
                if lease is None:
                    continue
                if self._stale(lease, info.mtime, LEASE_TTL_S):
                    self.objects.delete(info.key)
                    continue
                keep.update(lease.get("addresses", ()))
            for snap in self._all_snapshots():
                keep.update(c.address for c in snap.chunks if c.address)
            now = time.time()
            doomed = [
                info for info in self.objects.list("chunks/")
                if info.key.rsplit("/", 1)[-1] not in keep and now - info.mtime >= grace_s
            ]
            with ThreadPoolExecutor(self.workers) as pool:
                list(pool.map(lambda i: self.objects.delete(i.key), doomed))
            self._prune_gc_records(record_key)
        finally:
            record["end"] = time.time()
            self.objects.put(record_key, json.dumps(record).encode())
        return GcResult(chunks_deleted=len(doomed), bytes_freed=sum(i.size for i in doomed))

    def _all_snapshots(self) -> Iterable[StoredSnapshot]:
        keys = [i.key for i in self.objects.list("snapshots/") if i.key.endswith(_SUFFIX)]
        with ThreadPoolExecutor(self.workers) as pool:
            for key, raw in zip(keys, pool.map(self.objects.get, keys), strict=True):
                if raw is not None:
                    yield self._parse(key[len("snapshots/"): -len(_SUFFIX)], raw)

    def _prune_gc_records(self, own: str) -> None:
        now = time.time()
        for info in list(self.objects.list("gc/")):
            if info.key != own and now - info.mtime > _GC_RECORD_KEEP_S:
                self.objects.delete(info.key)


def open_store(name: str, config: StoreConfig) -> SnapshotStore:
    """A :class:`SnapshotStore` for ``[stores.NAME]``."""
    return SnapshotStore(name, config)


__all__ += ["FileObjects", "S3Objects", "open_store"]
