"""squibd side of the comparison benchmarks: saves of a random-filled guest.

Theory of operation
-------------------
``vs_qemu`` compares a durable squibd Full save with QEMU's migrate-to-file of
the same amount of random-filled RAM, and squibd's live-save pause with QEMU's
background-snapshot downtime. Two paths exist, tried in this order:

``runtime``
    The real thing: ``squibd.vm.runtime.Runtime`` creates a VM with the
    built-in guest, its RAM is filled with random bytes, and ``Runtime.save``
    runs on the started-then-paused VM (durable: fsync'd and committed as a
    pair), like QEMU saving a VM paused with -S. Only the *holes* of each
    region's memfd (pages the guest image never touched, found with
    ``SEEK_HOLE``/``SEEK_DATA``) are filled, so the guest's code and page
    tables stay intact and a started guest keeps running.
``memwriter``
    Before the runtime exists: ``squibd.snapshot.memwriter.write_memory`` of a
    random-filled ``GuestMemory`` into a ``PairTransaction``, committed with a
    placeholder state body. It is the memory-writer cost without VM capture.

:func:`bench_vm` gives a long-lived runtime VM (:class:`BenchVm`) so that a
caller can interleave squibd saves with a baseline's; :func:`full_save` and
:func:`live_pause` run whole series and return ``(Stats, path)``.
:class:`SquibdUnavailable` says why a path cannot run.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import _common
import attrs
import numpy as np
import trio

# A save's state file is a few KiB; the memwriter path commits this many bytes
# in its place (one vCPU's x86 state encodes to about this size).
PLACEHOLDER_STATE_BYTES = 8 * 1024
BENCH_VM_ID = "bench"
BENCH_VCPUS = 1
PATH_RUNTIME = "runtime"
PATH_MEMWRITER = "memwriter"


class SquibdUnavailable(RuntimeError):
    """Neither the runtime nor the memory writer can be imported here (names why)."""


def _try_import(name: str) -> tuple[Any | None, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # any import-time failure means "not usable yet"
        return None, f"{name}: {type(exc).__name__}: {exc}"


def fill_holes_random(fd: int, view: memoryview, size: int, rng: np.random.Generator) -> int:
    """Fill every hole of memfd ``fd`` (mapped as ``view``) with random bytes.

    Pages that hold data (the guest image) are left alone. Returns bytes filled.
    """
    target = np.frombuffer(view.cast("B"), dtype=np.uint8)
    filled = 0
    pos = 0
    while pos < size:
        try:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
        except OSError:
            break
        if hole >= size:
            break
        try:
            data = os.lseek(fd, hole, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after the hole, it runs to the end
            data = size
        for off in range(hole, data, _common.FILL_CHUNK):
            end = min(off + _common.FILL_CHUNK, data)
            target[off:end] = _common.random_block(end - off, rng)
        filled += data - hole
        pos = data
    return filled


def _fill_vm_memory(vm: Any, *, seed: int | None = None) -> int:
    rng = np.random.default_rng(seed)
    filled = 0
    for region in vm.memory.regions:
        if region.fd is None:
            _common.fill_random(region.view, seed=seed)
            filled += region.size
        else:
            filled += fill_holes_random(region.fd, region.view, region.size, rng)
    return filled


def _cleanup(*paths: str) -> Callable[[], None]:
    def remove() -> None:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
    return remove


@attrs.define(eq=False)
class BenchVm:
    """A runtime VM with random-filled RAM, kept for many saves (see :func:`bench_vm`).

    Between saves the VM is Paused (no vCPU competes with a baseline for the
    two cores); :meth:`save_live` resumes it first, as a live save needs a
    running guest, and pauses it again afterwards.
    """

    rt: Any
    directory: str
    mem_mib: int
    program: str
    filled_bytes: int = 0

    def _paths(self, stem: str) -> tuple[str, str]:
        return os.path.join(self.directory, f"{stem}.snap"), os.path.join(self.directory,
                                                                           f"{stem}.mem")

    async def save_full(self) -> float:
        """One durable stop-and-copy Full save of the paused VM; wall seconds (files removed)."""
        snap, mem = self._paths("full")
        try:
            with _common.Stopwatch() as sw:
                await self.rt.save(BENCH_VM_ID, "Full", snap, mem)
        finally:
            _cleanup(snap, mem)()
        return sw.seconds

    async def save_live(self) -> Any:
        """One live Full save of the running guest; the runtime's SaveResult (files removed)."""
        snap, mem = self._paths("live")
        await self.rt.resume(BENCH_VM_ID)
        try:
            return await self.rt.save(BENCH_VM_ID, "Full", snap, mem, live=True)
        finally:
            _cleanup(snap, mem)()
            await self.rt.pause(BENCH_VM_ID)


@asynccontextmanager
async def bench_vm(mem_mib: int, directory: str, *,
                   program: str = "counter") -> AsyncIterator[BenchVm]:
    """A started-then-paused VM of ``mem_mib`` MiB with random-filled RAM (runtime path).

    Raises:
        SquibdUnavailable: the runtime does not import or /dev/kvm is missing.
    """
    runtime_mod, why = _try_import("squibd.vm.runtime")
    models_mod, why_models = _try_import("squibd.vm.models")
    if runtime_mod is None or models_mod is None:
        raise SquibdUnavailable(why or why_models or "squibd.vm unavailable")
    if not _common.kvm_available():
        raise SquibdUnavailable("/dev/kvm is not available")
    rt = runtime_mod.Runtime()
    try:
        vm = await rt.create_vm(BENCH_VM_ID, BENCH_VCPUS, mem_mib, False,
                                models_mod.GuestSpec(program=program))
        filled = await trio.to_thread.run_sync(_fill_vm_memory, vm)
        # Only a started VM can be saved; keep it paused between saves so that,
        # like QEMU -S, a stop-and-copy save is of a paused VM.
        await rt.start(BENCH_VM_ID)
        await rt.pause(BENCH_VM_ID)
        yield BenchVm(rt=rt, directory=directory, mem_mib=mem_mib, program=program,
                      filled_bytes=filled)
    finally:
        await rt.aclose()


async def _runtime_full_save(mem_mib: int, reps: int, directory: str) -> _common.Stats:
    async with bench_vm(mem_mib, directory) as vm:
        samples = [await vm.save_full() for _ in range(reps + _common.DEFAULT_WARMUP)]
    return _common.summarize(samples[_common.DEFAULT_WARMUP:])


def _memwriter_full_save(mem_mib: int, reps: int, directory: str) -> _common.Stats:
    commit = importlib.import_module("squibd.snapshot.commit")
    from squibd.snapshot.manifest import KIND_FULL
    from squibd.snapshot.memwriter import write_memory
    from squibd.vm.memory import GuestMemory

    snap = os.path.join(directory, "full.snap")
    mem = os.path.join(directory, "full.mem")
    state = os.urandom(PLACEHOLDER_STATE_BYTES)
    with GuestMemory.create(mem_mib) as gm:
        for region in gm.regions:
            _common.fill_random(region.view)
        sources = gm.regions  # GuestRegion satisfies memwriter.RegionSource

        def save() -> None:
            with commit.PairTransaction(snap, mem) as txn:
                write_memory(txn.mem_fd, sources, kind=KIND_FULL, runs_per_region=None)
                txn.commit(state)

        return _common.measure(save, reps=reps, teardown=_cleanup(snap, mem))


def full_save(mem_mib: int, reps: int) -> tuple[_common.Stats, str]:
    """Durable Full save time (s) of a ``mem_mib`` guest with random-filled RAM.

    Raises:
        SquibdUnavailable: neither path imports (message lists both reasons).
    """
    runtime_mod, why_runtime = _try_import("squibd.vm.runtime")
    with _common.scratch_dir() as directory:
        if runtime_mod is not None and _common.kvm_available():
            stats = trio.run(_runtime_full_save, mem_mib, reps, directory)
            return stats, PATH_RUNTIME
        memwriter, why_memwriter = _try_import("squibd.snapshot.memwriter")
        commit, why_commit = _try_import("squibd.snapshot.commit")
        if memwriter is not None and commit is not None:
            return _memwriter_full_save(mem_mib, reps, directory), PATH_MEMWRITER
    reasons = [r for r in (why_runtime, why_memwriter, why_commit) if r]
    raise SquibdUnavailable("; ".join(reasons) or "/dev/kvm is not available")


async def _runtime_live_pause(mem_mib: int, reps: int, directory: str,
                              program: str) -> tuple[_common.Stats, list[int]]:
    async with bench_vm(mem_mib, directory, program=program) as vm:
        results = [await vm.save_live() for _ in range(reps + _common.DEFAULT_WARMUP)]
    measured = results[_common.DEFAULT_WARMUP:]
    return (_common.summarize([float(r.pause_ms) for r in measured]),
            [int(r.passes) for r in measured])


def live_pause(mem_mib: int, reps: int, *, program: str = "counter") -> tuple[_common.Stats, str]:
    """Pause (ms) of a live Full save of a running ``mem_mib`` guest, as the runtime reports it.

    Raises:
        SquibdUnavailable: the runtime does not import or /dev/kvm is missing.
    """
    with _common.scratch_dir() as directory:
        stats, passes = trio.run(_runtime_live_pause, mem_mib, reps, directory, program)
    return stats, f"{PATH_RUNTIME} (guest {program}, passes {passes})"
