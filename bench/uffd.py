"""Lazy restore through userfaultfd (issue 7, Figures).

Figures:
- ``fault_4k``: demand faults served per second at 4 KiB: one thread reads a
  fresh Uffd mapping of a random-filled memory file front to back
  (``ctypes.memmove``, GIL released) while ``squibd --page-server
  --no-stream`` (a separate process) serves every fault with UFFDIO_COPY
  after checking each 2 MiB chunk's xxh3 digest. Baseline in the same run:
  the same read of a ``MAP_PRIVATE`` mapping of the same file (kernel page
  cache faults: what the File backend pays).
- ``fault_2m``: the same with ``--fault-granule 2097152`` (one fault installs
  2 MiB).
- ``stream``: background streaming throughput: from the handshake until the
  server logs that every page is installed (2 MiB chunks, digests checked).
  Baseline: copying the memory file eagerly into a fresh memfd mapping.
- ``load`` (needs /dev/kvm): ``Runtime.load(..., resume_vm=True)`` to its
  return, to the guest's counter moving past the saved value, and the
  backend's own step (``map_memory_ms``: mapping the file, or anonymous
  memory + userfaultfd registration + handshake + prefetch), Uffd (page
  server process started before the clock) vs File backend, for 1 GiB and
  4 GiB counter guests (256 MiB with ``--quick``). The snapshots are sparse
  (the counter guest touches a few pages), so this measures the fixed cost.
- ``load[].FcHandler`` (issue 14): the same load through a minimal
  Firecracker-style handler (``bench/_fc_handler.py``: accepts, reads the
  handshake, serves faults with UFFDIO_COPY, never answers).
  ``fc_handler_minus_squibd_ms`` is its median load-to-running (``load_ms``,
  ``resume_vm=True``) minus squibd's page server's; the target is within
  ``fc_handler_target_ms`` (10 ms). ``--load-only`` measures only the loads.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import pathlib
import subprocess
import sys
import time
import uuid
from typing import Any

import _common
import numpy as np
import trio

from squibd.snapshot.digest import manifest_digests
from squibd.snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    KIND_FULL,
    Extent,
    MemoryManifest,
    MemoryRegion,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
HUGE = 2 * _common.MIB
FAULT_MIB = 256
QUICK_FAULT_MIB = 64
LOAD_SIZES_MIB = (1024, 4096)
QUICK_LOAD_SIZES_MIB = (256,)
COPY_BLOCK = 8 * _common.MIB
#: Issue 14: load through a Firecracker-style handler within 10 ms of squibd's server.
FC_HANDLER_TARGET_MS = 10.0


def _write_pair(directory: str, size: int) -> str:
    """A random-filled Full memory file + state file (no VM needed); returns the state path."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from tests.uffd._pairs import vcpu_state, write_state  # the same builder the tests use

    mem = os.path.join(directory, "f.mem")
    fd = os.open(mem, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _common.fill_random_fd(fd, size, seed=7)
        extents = (Extent(0, size),)
        digests = manifest_digests(
            lambda offset, length: os.pread(fd, length, offset), extents, algorithm="xxh3-64"
        )
    finally:
        os.close(fd)
    manifest = MemoryManifest(
        page_size=PAGE, regions=(MemoryRegion(0, size, 0),), kind=KIND_FULL, file_size=size,
        pair_id=str(uuid.uuid4()), parent_pair_id=None, extents=extents,
        digest_algorithm="xxh3-64", chunk_size=DEFAULT_CHUNK_SIZE, digests=digests,
    )
    snap = os.path.join(directory, "f.snap")
    write_state(pathlib.Path(snap), manifest, (vcpu_state(rip=0, rsp=0),))
    return snap


def _start_server(snap: str, sock: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "squibd.cli.daemon", "--page-server", "--snapshot", snap,
         "--socket", sock, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        raise RuntimeError(f"page server did not start: {proc.communicate()[1]}")
    return proc


def _start_fc_handler(sock: str, mem: str) -> subprocess.Popen[str]:
    handler = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_fc_handler.py")
    proc = subprocess.Popen([sys.executable, handler, sock, mem], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith("listening"):
        proc.kill()
        raise RuntimeError("the Firecracker-style handler did not start")
    return proc


def _wait_stderr(proc: subprocess.Popen[str], needle: str) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if needle in line:
            return
    raise RuntimeError(f"page server ended before {needle!r}")


def _uffd_read(snap: str, directory: str, size: int, *extra: str, stream: bool = False
               ) -> float:
    """Seconds to get every byte of a Uffd mapping (demand reads, or waiting for the stream)."""
    from squibd.uffd import UffdBackend
    from squibd.vm.memory import GuestMemory

    sock = os.path.join(directory, "ps.sock")
    proc = _start_server(snap, sock, *(extra if stream else ("--no-stream", *extra)))
    try:
        with GuestMemory.anonymous((MemoryRegion(0, size, 0),)) as memory:
            sink = ctypes.create_string_buffer(COPY_BLOCK)
            t0 = time.perf_counter()
            backend = UffdBackend.connect(sock, memory)
            try:
                if stream:
                    _wait_stderr(proc, "background streaming done")
                else:
                    base = memory.regions[0].host_addr
                    for offset in range(0, size, COPY_BLOCK):
                        ctypes.memmove(sink, base + offset, COPY_BLOCK)
                elapsed = time.perf_counter() - t0
            finally:
                backend.close()
    finally:
        proc.kill()
        proc.communicate()
    return elapsed


def _file_read(mem: str, size: int) -> float:
    fd = os.open(mem, os.O_RDONLY)
    try:
        with mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
                       ) as mapping:
            anchor = ctypes.c_char.from_buffer(mapping)
            base = ctypes.addressof(anchor)
            sink = ctypes.create_string_buffer(COPY_BLOCK)
            t0 = time.perf_counter()
            for offset in range(0, size, COPY_BLOCK):
                ctypes.memmove(sink, base + offset, COPY_BLOCK)
            elapsed = time.perf_counter() - t0
            del anchor
    finally:
        os.close(fd)
    return elapsed


def _stats(samples: list[float]) -> _common.Stats:
    return _common.summarize(samples)


def _fault_figures(reps: int, size: int, directory: str) -> dict[str, Any]:
    snap = _write_pair(directory, size)
    mem = os.path.join(directory, "f.mem")
    pages, huge = size // PAGE, size // HUGE
    results: dict[str, Any] = {"mem_mib": size // _common.MIB}
    for name, extra, count in (("fault_4k", (), pages),
                               ("fault_2m", ("--fault-granule", str(HUGE)), huge)):
        _uffd_read(snap, directory, size, *extra)  # warm-up
        uffd = _stats([_uffd_read(snap, directory, size, *extra) for _ in range(reps)])
        _file_read(mem, size)
        base = _stats([_file_read(mem, size) for _ in range(reps)])
        results[name] = {
            "faults_per_s": round(count / uffd.median),
            "uffd_s": uffd.to_dict(),
            "file_mapping_s": base.to_dict(),
            "gb_per_s": round(size / uffd.median / 1e9, 3),
            "ratio": _common.ratio(uffd.median, base.median),
        }
    _uffd_read(snap, directory, size, stream=True)
    stream = _stats([_uffd_read(snap, directory, size, stream=True) for _ in range(reps)])
    eager = _common.measure(lambda: _common.eager_copy(mem, size), reps=reps)
    results["stream"] = {
        "gb_per_s": round(size / stream.median / 1e9, 3),
        "stream_s": stream.to_dict(),
        "eager_copy_s": eager.to_dict(),
        "ratio": _common.ratio(stream.median, eager.median),
    }
    return results


async def _load_one(mem_mib: int, reps: int, directory: str) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec, MemBackend
    from squibd.vm.runtime import Runtime

    snap = os.path.join(directory, f"l{mem_mib}.snap")
    mem = os.path.join(directory, f"l{mem_mib}.mem")
    sock = os.path.join(directory, "load.sock")
    rt = Runtime()
    try:
        vm = await rt.create_vm("src", 1, mem_mib, False, GuestSpec("counter"))
        await rt.start("src")
        await vm.wait_heartbeats(1)
        await rt.save("src", "Full", snap, mem, resume=False)
        saved = vm.guest_progress()[0]
        await rt.destroy("src")

        async def one(kind: str) -> tuple[float, float, float]:
            if os.path.exists(sock):
                os.unlink(sock)
            proc = None
            if kind == "Uffd":
                proc = _start_server(snap, sock)
            elif kind == "FcHandler":
                proc = _start_fc_handler(sock, mem)
            backend = "File" if kind == "File" else "Uffd"
            try:
                path = sock if proc else mem
                phases: dict[str, float] = {}

                def progress(phase: str, _done: int, _total: int) -> None:
                    phases[phase] = time.perf_counter()

                t0 = time.perf_counter()
                restored = await rt.load("dst", snap, MemBackend(backend, path), resume_vm=True,
                                         progress=progress)
                loaded = time.perf_counter() - t0
                mapped = phases.get("map-memory", t0) - phases.get("check-pair", t0)
                while (await trio.to_thread.run_sync(restored.guest_progress))[0] <= saved:
                    await restored.wait_heartbeats(1)
                moved = time.perf_counter() - t0
                await rt.destroy("dst")
            finally:
                if proc is not None:
                    proc.kill()
                    proc.communicate()
            return loaded, moved, mapped

        figures: dict[str, Any] = {"mem_mib": mem_mib}
        for kind in ("Uffd", "FcHandler", "File"):
            await one(kind)  # warm-up
            runs = [await one(kind) for _ in range(reps)]
            figures[kind] = {
                "load_ms": _stats([r[0] for r in runs]).scaled(1000).to_dict(),
                "first_progress_ms": _stats([r[1] for r in runs]).scaled(1000).to_dict(),
                # The backend-specific step: map the file / map anonymous + uffd handshake.
                "map_memory_ms": _stats([r[2] for r in runs]).scaled(1000).to_dict(),
            }
        figures["ratio_uffd_vs_file"] = _common.ratio(
            figures["Uffd"]["load_ms"]["median"], figures["File"]["load_ms"]["median"]
        )
        figures["fc_handler_minus_squibd_ms"] = round(
            figures["FcHandler"]["load_ms"]["median"] - figures["Uffd"]["load_ms"]["median"], 3
        )
        return figures
    finally:
        await rt.aclose()
        for path in (snap, mem):
            if os.path.exists(path):
                os.unlink(path)


def main(args: Any) -> dict[str, Any]:
    size = (QUICK_FAULT_MIB if args.quick else FAULT_MIB) * _common.MIB
    with _common.scratch_dir() as directory:
        result = {} if args.load_only else _fault_figures(args.reps, size, directory)
        if _common.kvm_available():
            sizes = QUICK_LOAD_SIZES_MIB if args.quick else LOAD_SIZES_MIB

            async def loads() -> list[dict[str, Any]]:
                return [await _load_one(s, args.reps, directory) for s in sizes]

            result["load"] = trio.run(loads)
            result["load_target_ms"] = 50.0
            result["fc_handler_target_ms"] = FC_HANDLER_TARGET_MS
    if not args.load_only:
        result["uffd_faults_per_s"] = {"4k": result["fault_4k"]["faults_per_s"],
                                       "2m": result["fault_2m"]["faults_per_s"]}
    result["np"] = np.__version__
    return result


if __name__ == "__main__":
    def _extra(parser: Any) -> None:
        parser.add_argument("--load-only", action="store_true",
                            help="only the load figures (needs /dev/kvm)")

    _common.run_bench("uffd", main, _common.parse_args(__doc__ or "", extra=_extra))
