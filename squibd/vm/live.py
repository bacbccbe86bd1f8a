"""Live save: pre-copy passes while the guest runs, then a short pause (SPEC section 5).

Theory of operation. With dirty logging on (turned on for the save's
duration on a VM created without it, Full only):

- pass 1 harvests the KVM log (so that from now on every guest write is
  logged) and streams, while the guest runs, every page (Full) or the
  dirty set (Diff) into the pair's temp memory file;
- each later pass harvests what the guest dirtied during the previous
  pass and streams it, still running;
- when the estimated time to write the remainder (pages dirtied since the
  last harvest, at the throughput of the last pass) fits the pause budget,
  or when only the final pass is left of ``max_passes``, the vCPUs are
  quiesced; the final pass harvests once more and writes the remainder
  plus every page squibd itself wrote meanwhile (the device-write journal),
  the state is captured and the VM resumed. That is the pause.

Every page is written by the last pass that saw it dirty, after the KVM
log was reset for it, so the file equals guest memory at the pause
instant. Because later passes overwrite pages, the chunks they touched are
digested again from the temp file after the final pass (while the guest
runs again); chunks only one pass wrote keep that pass's digests. The commit, and the clear of
the dirty set (exactly the words seen up to the pause), come after that.

Failures (quiesce timeout, cancel, ENOSPC, ...) at any pass abort the
transaction (temps removed), resume the VM if it was paused here, turn
temporary dirty logging off again, and keep the dirty set.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Final

import attrs
import trio

from ..snapshot.bitmap import Words
from ..snapshot.commit import PairTransaction
from ..snapshot.digest import DEFAULT_ALGORITHM, DigestFunction, digest_function
from ..snapshot.errors import MemoryIo
from ..snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZES,
    KIND_DIFF,
    Extent,
    MemoryManifest,
    iter_chunks,
)
from ..snapshot.memwriter import (
    DEFAULT_METHOD,
    WriteCancelled,
    WriteResult,
    merge_extents,
    write_memory,
)
from ._threads import run_blocking, run_cancellable
from .dirty import or_words, page_count, runs_of
from .machine import CapturedState, Vm
from .models import Progress, SaveResult, VmState
from .save import (
    ByteProgress,
    SaveRequest,
    capture,
    commit_state,
    save_stop_and_copy,
    thread_progress,
)

__all__ = ["save_live"]

_MS_PER_S: Final = 1000.0
#: Assumed write rate before the first pass measured one: the page-cache
#: rate KVM-NOTES measured for a memfd mapping (about 3.9 GB/s), halved for
#: a noisy shared host.
_INITIAL_BYTES_PER_S: Final = 2.0e9
#: Write primitive of the later passes: buffered ``pwrite`` into the page
#: cache. They must be short so that the guest re-dirties little meanwhile,
#: and the final one runs paused: none may wait for synchronous (O_DIRECT)
#: disk writes. The commit's fsync, after the resume, makes them durable.
_LIVE_METHOD: Final = "pwrite"
#: Pass 1 streams the bulk while the guest runs, with the memory writer's
#: default (O_DIRECT for large pieces, chosen by bench/memory_save.py for
#: durable bulk writes): it leaves little for the commit's fsync and does not
#: flood the page cache (buffered 4 GiB hits the dirty-page limits, KVM-NOTES).
_FIRST_PASS_METHOD: Final = DEFAULT_METHOD


def _split_at(extents: Sequence[Extent], boundaries: Sequence[int]) -> tuple[Extent, ...]:
    """Cut extents at region starts, as ``write_memory`` reports them."""
    out: list[Extent] = []
    for extent in extents:
        start = extent.offset
        for boundary in boundaries:
            if start < boundary < extent.end:
                out.append(Extent(start, boundary - start))
                start = boundary
        out.append(Extent(start, extent.end - start))
    return tuple(out)


def _read_digest(fd: int, chunk: Extent, buffer: memoryview, hash_of: DigestFunction) -> bytes:
    view = buffer[: chunk.length]
    done = 0
    while done < chunk.length:
        got = os.preadv(fd, [view[done:]], chunk.offset + done)
        if got == 0:
            raise MemoryIo(errno.EIO)  # the temp file ended inside a written chunk
        done += got
    return hash_of(view)


class _ChunkDigests:
    """Digests the passes computed, and which chunks later passes made stale.

    A chunk of the final manifest keeps the digest a pass computed when that
    pass was the only one to write into it and wrote exactly that chunk;
    every other chunk is read back from the temp file and hashed again.
    """

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._digests: dict[tuple[int, int], bytes] = {}
        self._writers: dict[int, set[int]] = {}

    def record(self, pass_index: int, result: WriteResult) -> None:
        size = DIGEST_SIZES[result.algorithm]
        for number, chunk in enumerate(iter_chunks(result.extents, self.chunk_size)):
            self._writers.setdefault(chunk.offset // self.chunk_size, set()).add(pass_index)
            self._digests[(chunk.offset, chunk.length)] = result.digests[
                number * size : (number + 1) * size
            ]

    def final(self, fd: int, extents: tuple[Extent, ...], cancel: threading.Event) -> bytes:
        hash_of = digest_function(DEFAULT_ALGORITHM)
        out: list[bytes] = []
        buffer = memoryview(bytearray(self.chunk_size))
        try:
            for chunk in iter_chunks(extents, self.chunk_size):
                if cancel.is_set():
                    raise WriteCancelled("digest of the live save cancelled")
                known = self._digests.get((chunk.offset, chunk.length))
                if known is not None and len(self._writers[chunk.offset // self.chunk_size]) == 1:
                    out.append(known)
                else:
                    out.append(_read_digest(fd, chunk, buffer, hash_of))
        finally:
            buffer.release()
        return b"".join(out)


class _LivePair:
    """The open pair transaction and what the passes wrote into it (worker threads)."""

    def __init__(self, vm: Vm, request: SaveRequest) -> None:
        self.vm = vm
        self.request = request
        self.txn = PairTransaction(request.snapshot_path, request.mem_file_path)
        self.extents: list[Extent] = []
        self.bytes_per_pass: list[int] = []
        self.digests = _ChunkDigests(DEFAULT_CHUNK_SIZE)

    def write_pass(
        self,
        kind: str,
        runs: list[list[tuple[int, int]]] | None,
        cancel: threading.Event,
        *,
        progress: ByteProgress | None,
        method: str = _LIVE_METHOD,
    ) -> float:
        """Stream one pass; returns its duration in seconds."""
        began = time.perf_counter()
        result = write_memory(
            self.txn.mem_fd,
            self.vm.region_sources(),
            kind=kind,
            runs_per_region=runs,
            progress=progress,
            cancel=cancel,
            algorithm=DEFAULT_ALGORITHM,
            chunk_size=DEFAULT_CHUNK_SIZE,
            method=method,
        )
        self.digests.record(len(self.bytes_per_pass), result)
        self.extents.extend(result.extents)
        self.bytes_per_pass.append(result.bytes_written)
        return time.perf_counter() - began

    def commit(
        self, captured: CapturedState, pair_id: str, parent: str | None, cancel: threading.Event
    ) -> MemoryManifest:
        """Digest the union of the passes, encode the state, commit the pair."""
        boundaries = [region.file_offset for region in self.vm.memory.regions[1:]]
        extents = _split_at(merge_extents(self.extents), boundaries)
        manifest = MemoryManifest(
            page_size=self.vm.page_size,
            regions=self.vm.memory.manifest_regions(),
            kind=self.request.kind,
            file_size=self.vm.memory.total_size,
            pair_id=pair_id,
            parent_pair_id=parent,
            extents=extents,
            digest_algorithm=DEFAULT_ALGORITHM,
            chunk_size=DEFAULT_CHUNK_SIZE,
            digests=self.digests.final(self.txn.mem_fd, extents, cancel),
        )
        commit_state(self.txn, self.vm, captured, manifest, self.request.metadata)
        return manifest

    def abort(self) -> None:
        """Remove the temps (idempotent; a no-op after a commit)."""
        self.txn.abort()


async def save_live(
    vm: Vm,
    request: SaveRequest,
    *,
    limiter: trio.CapacityLimiter,
    progress: Progress | None,
) -> SaveResult:
    """Save ``vm`` with pre-copy passes and a short final pause (see the module doc)."""
    if vm.state is not VmState.RUNNING or request.max_passes == 1:
        # Nothing runs meanwhile (or no pre-copy pass is allowed): the final
        # pass is the whole save.
        result = await save_stop_and_copy(vm, request, limiter=limiter, progress=progress)
        return attrs.evolve(
            result, live=True, passes=1, pass_limit_reached=request.max_passes == 1
        )
    started = time.perf_counter()
    enabled_here = not vm.dirty_logging
    diff = request.kind == KIND_DIFF
    parent = vm.last_pair_id if diff else None
    pair_id = str(uuid.uuid4())
    paused_at: float | None = None
    pause_ms = 0.0
    committed = False
    pair: _LivePair | None = None
    if enabled_here:
        await run_blocking(lambda: vm.set_dirty_logging(True), limiter)
    vm.dirty.begin_journal()
    try:
        pair = await run_blocking(lambda: _LivePair(vm, request), limiter)
        live_pair = pair
        # Pass 1: reset the log, then everything (Full) or the dirty set (Diff).
        await run_blocking(vm.harvest_kvm, limiter)
        runs = runs_of(vm.dirty.words()) if diff else None
        seconds = await run_cancellable(
            functools.partial(
                live_pair.write_pass,
                request.kind,
                runs,
                progress=thread_progress(progress, "pass-1"),
                method=_FIRST_PASS_METHOD,
            ),
            limiter,
        )
        passes = 1
        limit_reached = False
        leftover: list[Words] | None = None
        rate = _INITIAL_BYTES_PER_S
        while True:
            if seconds > 0 and live_pair.bytes_per_pass[-1] > 0:
                rate = live_pair.bytes_per_pass[-1] / seconds
            if passes + 1 >= request.max_passes:
                limit_reached = True
                break
            harvested = await run_blocking(vm.harvest_kvm, limiter)
            remaining = page_count(harvested) * vm.page_size
            if remaining / rate * _MS_PER_S <= request.pause_budget_ms:
                # The log was reset for these pages: the final pass writes them.
                leftover = harvested
                break
            passes += 1
            seconds = await run_cancellable(
                functools.partial(
                    live_pair.write_pass,
                    KIND_DIFF,
                    runs_of(harvested),
                    progress=thread_progress(progress, f"pass-{passes}"),
                ),
                limiter,
            )
        # Final pass: pause, harvest, write the remainder, capture.
        paused_at = time.perf_counter()
        await vm.pause()
        final_harvest = await run_blocking(vm.harvest_kvm, limiter)
        seen = vm.dirty.words()  # the dirty set only grows during the save
        final_words = or_words(or_words(final_harvest, leftover), vm.dirty.journal_words())
        passes += 1
        final_runs = runs_of(final_words)
        await run_cancellable(
            functools.partial(
                live_pair.write_pass,
                KIND_DIFF,
                final_runs,
                progress=thread_progress(progress, f"pass-{passes}"),
            ),
            limiter,
        )
        captured = await capture(vm, limiter)
        if request.resume:
            vm.resume()
            pause_ms = (time.perf_counter() - paused_at) * _MS_PER_S
            paused_at = None
        manifest = await run_cancellable(
            lambda cancel: live_pair.commit(captured, pair_id, parent, cancel), limiter
        )
        vm.dirty.clear(seen)
        vm.last_pair_id = pair_id
        committed = True
    finally:
        vm.dirty.end_journal()
        if pair is not None and not committed:
            closing = pair
            with trio.CancelScope(shield=True):
                await run_blocking(closing.abort, limiter)
        if paused_at is not None:
            if not committed or request.resume:
                vm.resume()
            pause_ms = (time.perf_counter() - paused_at) * _MS_PER_S
        if enabled_here:
            with trio.CancelScope(shield=True):
                await run_blocking(lambda: vm.set_dirty_logging(False), limiter)
    return SaveResult(
        vm_id=vm.vm_id,
        snapshot_type=request.snapshot_type,
        snapshot_path=request.snapshot_path,
        mem_file_path=request.mem_file_path,
        pair_id=pair_id,
        parent_pair_id=parent,
        bytes_written=manifest.bytes_written,
        pages_written=manifest.bytes_written // vm.page_size,
        live=True,
        passes=passes,
        bytes_per_pass=tuple(live_pair.bytes_per_pass),
        pause_ms=pause_ms,
        pass_limit_reached=limit_reached,
        duration_ms=(time.perf_counter() - started) * _MS_PER_S,
    )
