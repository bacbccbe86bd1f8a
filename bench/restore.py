"""Restore time: snapshot.load (File backend) to a running guest (issue 4, Figures).

Figures (1 GiB guest, or 256 MiB with ``--quick``; RAM entirely touched):
- ``restore_ms``: ``Runtime.load(..., MemBackend("File"), resume_vm=True)``
  from the call to its return with the vCPU threads running: read and check
  the state file (CRC, version, compat), check the pair binding, map the
  memory file ``MAP_PRIVATE | MAP_NORESERVE``, build the KVM VM, restore
  VM-level then vCPU state, start the vCPUs. Target <= 20 ms.
- ``first_progress_ms``: from the same start until the guest's counter moved
  past the saved value (pages fault in lazily from the page cache).
- baseline ``eager_copy_ms``: what an eager restore would pay first: copying
  the memory file into a fresh memfd mapping (``preadv`` in 8 MiB calls).
  BENCH.md also cites Firecracker's published figure (about 30 ms on 5.10
  hosts) as the external reference.

The pair is written once; the page cache is warm for both sides.
"""

from __future__ import annotations

import os
import time
from typing import Any

import _common
import _squibd
import numpy as np
import trio

SIZES_MIB = (1024,)
QUICK_SIZES_MIB = (256,)
#: Published Firecracker restore latency on x86 5.10 hosts (BENCH.md).
FIRECRACKER_PUBLISHED_MS = 30.0


async def _one_size(mem_mib: int, reps: int, directory: str) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec, MemBackend
    from squibd.vm.runtime import Runtime

    snap = os.path.join(directory, "r.snap")
    mem = os.path.join(directory, "r.mem")
    rt = Runtime()
    try:
        vm = await rt.create_vm("src", 1, mem_mib, False, GuestSpec("counter"))
        rng = np.random.default_rng(2)
        for region in vm.memory.regions:
            assert region.fd is not None
            _squibd.fill_holes_random(region.fd, region.view, region.size, rng)
        await rt.start("src")
        await vm.wait_heartbeats(1)
        await rt.save("src", "Full", snap, mem, resume=False)
        saved = vm.guest_progress()
        await rt.destroy("src")

        loads: list[float] = []
        progress: list[float] = []
        for i in range(1 + reps):
            t0 = time.perf_counter()
            restored = await rt.load("dst", snap, MemBackend("File", mem), resume_vm=True)
            loaded = time.perf_counter() - t0
            while restored.guest_progress()[0] <= saved[0]:
                await restored.wait_heartbeats(1)
            moved = time.perf_counter() - t0
            await rt.destroy("dst")
            if i > 0:  # the first load is the warm-up
                loads.append(loaded)
                progress.append(moved)
        size = mem_mib * _common.MIB
        eager = _common.measure(lambda: _common.eager_copy(mem, size), reps=reps).scaled(1000)
        restore = _common.summarize(loads).scaled(1000)
        return {
            "mem_mib": mem_mib,
            "restore_ms": restore.to_dict(),
            "first_progress_ms": _common.summarize(progress).scaled(1000).to_dict(),
            "eager_copy_ms": eager.to_dict(),
            "ratio": _common.ratio(restore.median, eager.median),
            "firecracker_published_ms": FIRECRACKER_PUBLISHED_MS,
            "ratio_vs_firecracker": _common.ratio(restore.median, FIRECRACKER_PUBLISHED_MS),
        }
    finally:
        await rt.aclose()


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("restore", "needs /dev/kvm")
    sizes = QUICK_SIZES_MIB if args.quick else SIZES_MIB

    async def run(directory: str) -> list[dict[str, Any]]:
        return [await _one_size(size, args.reps, directory) for size in sizes]

    with _common.scratch_dir() as directory:
        results = trio.run(run, directory)
    return {"sizes": results, "target_ms": 20.0, "machine": _common.machine_info()}


if __name__ == "__main__":
    _common.run_bench("restore", main, _common.parse_args(__doc__ or ""))
