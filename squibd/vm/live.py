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

Code: :class:`PassPlanner` is the policy (pure: when to stop pre-copying,
unit-tested without KVM); :class:`LiveSaveSession` is the mechanism and
owns everything a failure must undo (journal, temporary logging, temps,
the pause); ``_LivePair`` is the open pair transaction and its digests.
"""

from __future__ import annotations

import functools
import threading
import time
import uuid
from typing import Final

import attrs
import trio

from ..snapshot.bitmap import Words
from ..snapshot.commit import PairTransaction
from ..snapshot.digest import DEFAULT_ALGORITHM, file_chunk_digests
from ..snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZES,
    KIND_DIFF,
    Extent,
    MemoryManifest,
    iter_chunks,
    split_at_boundaries,
)
from ..snapshot.memwriter import (
    DEFAULT_METHOD,
    WriteCancelled,
    WriteResult,
    WriterThreads,
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
        def known(chunk: Extent) -> bytes | None:
            digest = self._digests.get((chunk.offset, chunk.length))
            if digest is not None and len(self._writers[chunk.offset // self.chunk_size]) == 1:
                return digest
            return None

        return file_chunk_digests(
            fd, extents, chunk_size=self.chunk_size, known=known, cancel=cancel,
            cancelled=lambda: WriteCancelled("digest of the live save cancelled"),
        )


class _LivePair:
    """The open pair transaction and what the passes wrote into it (worker threads)."""

    def __init__(self, vm: Vm, request: SaveRequest, threads: WriterThreads | None) -> None:
        self.vm = vm
        self.request = request
        self.threads = threads
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
            threads=self.threads,
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
        extents = split_at_boundaries(merge_extents(self.extents), boundaries)
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


@attrs.define
class PassPlanner:
    """The policy of a live save, pure (no KVM, no I/O): when to stop pre-copying.

    After each pre-copy pass, :meth:`record` its bytes and duration. Then
    :meth:`another_pass_allowed` says whether ``max_passes`` leaves room for
    one more pre-copy pass besides the final (paused) one; if it does, the
    caller harvests the pages dirtied meanwhile and :meth:`fits_pause` says
    whether writing them at the last measured rate fits ``pause_budget_ms``
    (pause now) or not (one more pass).
    """

    max_passes: int
    pause_budget_ms: float
    #: Write rate of the last pass that wrote something (bytes/s).
    rate: float = _INITIAL_BYTES_PER_S
    #: Pre-copy passes recorded so far.
    passes: int = 0

    def record(self, bytes_written: int, seconds: float) -> None:
        """Account one pre-copy pass."""
        self.passes += 1
        if seconds > 0 and bytes_written > 0:
            self.rate = bytes_written / seconds

    def another_pass_allowed(self) -> bool:
        """Whether one more pre-copy pass fits in ``max_passes`` (the final pass is counted)."""
        return self.passes + 2 <= self.max_passes

    def fits_pause(self, remaining_bytes: int) -> bool:
        """Whether writing ``remaining_bytes`` paused is expected to fit the budget."""
        return remaining_bytes / self.rate * _MS_PER_S <= self.pause_budget_ms


async def save_live(
    vm: Vm,
    request: SaveRequest,
    *,
    limiter: trio.CapacityLimiter,
    progress: Progress | None,
    threads: WriterThreads | None = None,
) -> SaveResult:
    """Save ``vm`` with pre-copy passes and a short final pause (see the module doc).

    ``threads``: where the memory writer's helper threads come from (the runtime's pool).
    """
    if vm.state is not VmState.RUNNING or request.max_passes == 1:
        # Nothing runs meanwhile (or no pre-copy pass is allowed): the final
        # pass is the whole save.
        result = await save_stop_and_copy(
            vm, request, limiter=limiter, progress=progress, threads=threads
        )
        return attrs.evolve(
            result, live=True, passes=1, pass_limit_reached=request.max_passes == 1
        )
    return await LiveSaveSession(vm, request, limiter, progress, threads).run()


@attrs.define(eq=False)
class LiveSaveSession:
    """One live save of a Running VM: the mechanism, driven by a :class:`PassPlanner`.

    It owns everything the save changes and must undo on failure: the
    temporary KVM dirty logging, the device-write journal, the pair's temps,
    and the pause. :meth:`run` always ends through :meth:`_finish`.
    """

    vm: Vm
    request: SaveRequest
    limiter: trio.CapacityLimiter
    progress: Progress | None
    threads: WriterThreads | None = None
    planner: PassPlanner = attrs.field(init=False)
    pair_id: str = attrs.field(init=False, factory=lambda: str(uuid.uuid4()))
    _pair: _LivePair | None = attrs.field(default=None, init=False)
    _logging_enabled_here: bool = attrs.field(default=False, init=False)
    _paused_at: float | None = attrs.field(default=None, init=False)
    _pause_ms: float = attrs.field(default=0.0, init=False)
    _committed: bool = attrs.field(default=False, init=False)
    _limit_reached: bool = attrs.field(default=False, init=False)

    @planner.default
    def _make_planner(self) -> PassPlanner:
        return PassPlanner(self.request.max_passes, self.request.pause_budget_ms)

    @property
    def _diff(self) -> bool:
        return self.request.kind == KIND_DIFF

    async def run(self) -> SaveResult:
        """Pre-copy, pause, final pass, resume, commit; undo everything on failure."""
        started = time.perf_counter()
        vm = self.vm
        parent = vm.last_pair_id if self._diff else None
        self._logging_enabled_here = not vm.dirty_logging
        if self._logging_enabled_here:
            await run_blocking(lambda: vm.set_dirty_logging(True), self.limiter)
        vm.dirty.begin_journal()
        try:
            pair = self._pair = await run_blocking(
                lambda: _LivePair(vm, self.request, self.threads), self.limiter
            )
            leftover = await self._precopy(pair)
            captured, seen = await self._final_pass(pair, leftover)
            if self.request.resume:
                self._resume()
            manifest = await run_cancellable(
                lambda cancel: pair.commit(captured, self.pair_id, parent, cancel), self.limiter
            )
            vm.dirty.clear(seen)
            vm.last_pair_id = self.pair_id
            self._committed = True
        finally:
            await self._finish()
        return SaveResult(
            vm_id=vm.vm_id,
            snapshot_type=self.request.snapshot_type,
            snapshot_path=self.request.snapshot_path,
            mem_file_path=self.request.mem_file_path,
            pair_id=self.pair_id,
            parent_pair_id=parent,
            bytes_written=manifest.bytes_written,
            pages_written=manifest.bytes_written // vm.page_size,
            live=True,
            passes=len(pair.bytes_per_pass),
            bytes_per_pass=tuple(pair.bytes_per_pass),
            pause_ms=self._pause_ms,
            pass_limit_reached=self._limit_reached,
            duration_ms=(time.perf_counter() - started) * _MS_PER_S,
        )

    async def _write_pass(
        self, pair: _LivePair, kind: str, runs: list[list[tuple[int, int]]] | None, method: str
    ) -> float:
        number = len(pair.bytes_per_pass) + 1
        return await run_cancellable(
            functools.partial(
                pair.write_pass,
                kind,
                runs,
                progress=thread_progress(self.progress, f"pass-{number}"),
                method=method,
            ),
            self.limiter,
        )

    async def _precopy(self, pair: _LivePair) -> list[Words] | None:
        """Pass 1 and the later running passes; returns a harvest the final pass must write."""
        vm = self.vm
        # Pass 1: reset the log, then everything (Full) or the dirty set (Diff).
        await run_blocking(vm.harvest_kvm, self.limiter)
        runs = runs_of(vm.dirty.words()) if self._diff else None
        seconds = await self._write_pass(pair, self.request.kind, runs, _FIRST_PASS_METHOD)
        self.planner.record(pair.bytes_per_pass[-1], seconds)
        while self.planner.another_pass_allowed():
            harvested = await run_blocking(vm.harvest_kvm, self.limiter)
            if self.planner.fits_pause(page_count(harvested) * vm.page_size):
                # The log was reset for these pages: the final pass writes them.
                return harvested
            seconds = await self._write_pass(pair, KIND_DIFF, runs_of(harvested), _LIVE_METHOD)
            self.planner.record(pair.bytes_per_pass[-1], seconds)
        self._limit_reached = True
        return None

    async def _final_pass(
        self, pair: _LivePair, leftover: list[Words] | None
    ) -> tuple[CapturedState, list[Words] | None]:
        """Pause, harvest, write the remainder and squibd's own writes, capture.

        Returns the captured state and the dirty words seen up to the pause
        (cleared after the commit).
        """
        vm = self.vm
        self._paused_at = time.perf_counter()
        await vm.pause()
        # A VM in its own process may have both answers at hand (prefetched by
        # the pause, ``remote.py``): no worker-thread round trip in the pause then.
        harvest_ready = getattr(vm, "harvest_kvm_ready", None)
        final_harvest = harvest_ready() if harvest_ready is not None else None
        if final_harvest is None:
            final_harvest = await run_blocking(vm.harvest_kvm, self.limiter)
        seen = vm.dirty.words()  # the dirty set only grows during the save
        final_words = or_words(or_words(final_harvest, leftover), vm.dirty.journal_words())
        await self._write_pass(pair, KIND_DIFF, runs_of(final_words), _LIVE_METHOD)
        capture_ready = getattr(vm, "capture_ready", None)
        captured = capture_ready() if capture_ready is not None else None
        if captured is None:
            captured = await capture(vm, self.limiter)
        return captured, seen

    def _resume(self) -> None:
        if self._paused_at is not None:
            self.vm.resume()
            self._pause_ms = (time.perf_counter() - self._paused_at) * _MS_PER_S
            self._paused_at = None

    async def _finish(self) -> None:
        """Undo what a failed save changed; end the journal and temporary logging."""
        vm = self.vm
        vm.dirty.end_journal()
        if self._pair is not None and not self._committed:
            pair = self._pair
            with trio.CancelScope(shield=True):
                await run_blocking(pair.abort, self.limiter)
        if self._paused_at is not None:
            if self._committed and not self.request.resume:
                # Left paused on purpose; still report how long the pause lasted so far.
                self._pause_ms = (time.perf_counter() - self._paused_at) * _MS_PER_S
            else:
                self._resume()
        if self._logging_enabled_here:
            with trio.CancelScope(shield=True):
                await run_blocking(lambda: vm.set_dirty_logging(False), self.limiter)
