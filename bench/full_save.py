"""Stop-and-copy Full save of a running guest with all memory touched (issue 4, Figures).

Figures (per size; 1 GiB, or 256 MiB with ``--quick``):
- ``full_save_s``: ``Runtime.save(Full)`` of a running ``counter`` guest
  whose RAM is entirely touched (random bytes): quiesce, capture, stream,
  encode, durable pair commit, resume.
- ``pause_ms``: the VM's pause during that save (quiesce start to resume).
- baseline ``baseline_s``: the same bytes written from the guest mapping to
  a file with plain ``pwrite`` in 8 MiB calls, then ``fsync`` (no digests,
  no state, no commit protocol), in the same directory.

Files go to ``$SQUIBD_BENCH_TMP`` (default /var/tmp, ext4) and are removed
after every repetition, untimed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import _common
import _squibd
import numpy as np
import trio

#: Baseline write size per pwrite call.
BASELINE_BLOCK = 8 * _common.MIB
SIZES_MIB = (1024,)
QUICK_SIZES_MIB = (256,)


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _baseline_write(vm: Any, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for region in vm.memory.regions:
            for offset in range(0, region.size, BASELINE_BLOCK):
                view = region.view[offset : min(offset + BASELINE_BLOCK, region.size)]
                position = region.file_offset + offset
                while view:
                    written = os.pwrite(fd, view, position)
                    view = view[written:]
                    position += written
        os.fsync(fd)
    finally:
        os.close(fd)


async def _one_size(mem_mib: int, reps: int, directory: str) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec
    from squibd.vm.runtime import Runtime

    snap = os.path.join(directory, "full.snap")
    mem = os.path.join(directory, "full.mem")
    raw = os.path.join(directory, "raw.mem")
    rt = Runtime()
    try:
        vm = await rt.create_vm("full", 1, mem_mib, False, GuestSpec("counter"))
        rng = np.random.default_rng(1)
        for region in vm.memory.regions:
            assert region.fd is not None
            _squibd.fill_holes_random(region.fd, region.view, region.size, rng)
        await rt.start("full")
        await vm.wait_heartbeats(1)
        pauses: list[float] = []
        written: list[int] = []

        async def save() -> None:
            result = await rt.save("full", "Full", snap, mem)
            pauses.append(result.pause_ms)
            written.append(result.bytes_written)

        async def cleanup() -> None:
            _remove(snap, mem)

        squibd = await _common.measure_async(save, reps=reps, teardown=cleanup)
        pause = _common.summarize(pauses[1:])  # the first sample is the warm-up
        baseline = _common.measure(
            lambda: _baseline_write(vm, raw), reps=reps, teardown=lambda: _remove(raw)
        )
        return {
            "mem_mib": mem_mib,
            "bytes_written": written[-1],
            "full_save_s": squibd.to_dict(),
            "pause_ms": pause.to_dict(),
            "baseline_s": baseline.to_dict(),
            "ratio": _common.ratio(squibd.median, baseline.median),
        }
    finally:
        await rt.aclose()


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("full_save", "needs /dev/kvm")
    sizes = QUICK_SIZES_MIB if args.quick else SIZES_MIB

    async def run(directory: str) -> list[dict[str, Any]]:
        return [await _one_size(size, args.reps, directory) for size in sizes]

    with _common.scratch_dir() as directory:
        results = trio.run(run, directory)
    return {"sizes": results, "machine": _common.machine_info()}


if __name__ == "__main__":
    _common.run_bench("full_save", main, _common.parse_args(__doc__ or ""))
