"""Pause of a live Full save vs a stop-and-copy Full of the same VM (issue 6).

Figures (per size: 1 GiB and 4 GiB, or 256 MiB with ``--quick``):
- ``live_pause_ms``: pause (quiesce start to resume) of
  ``Runtime.save(Full, live=True)`` while a ``memwriter`` guest keeps
  writing its working set; target <= 10 ms p50 at both sizes.
- baseline ``stop_copy_pause_ms``: pause of ``Runtime.save(Full)`` (stop and
  copy: the whole durable write happens paused) of the same VM.
- ``live_save_s`` / ``stop_copy_save_s``: wall time of each save.
- ``dirty_rate``: the guest's page writes per second (one 8-byte write per
  page, every page of the working set in turn) and its working set,
  measured just before the saves; ``passes`` and bytes per pass of the
  live saves.

Guest RAM outside the guest image is filled with random bytes, so each save
streams the whole memory. Files go to ``$SQUIBD_BENCH_TMP`` (default
/var/tmp) and are removed after each save, untimed.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import _common
import _squibd
import numpy as np
import trio

SIZES_MIB = (1024, 4096)
QUICK_SIZES_MIB = (256,)
#: memwriter working set (MiB) and stride: a guest dirtying a fixed set fast.
WORKING_SET_MIB = 64
STRIDE_PAGES = 1
#: Window over which the guest's write rate is measured.
RATE_WINDOW_S = 0.5


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _one_size(mem_mib: int, reps: int, directory: str) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec
    from squibd.vm.runtime import Runtime

    snap = os.path.join(directory, "l.snap")
    mem = os.path.join(directory, "l.mem")
    rt = Runtime()
    try:
        guest = GuestSpec(
            "memwriter", {"working_set_mib": WORKING_SET_MIB, "stride_pages": STRIDE_PAGES}
        )
        vm = await rt.create_vm("live", 1, mem_mib, False, guest)
        rng = np.random.default_rng(3)
        for region in vm.memory.regions:
            assert region.fd is not None
            _squibd.fill_holes_random(region.fd, region.view, region.size, rng)
        await rt.start("live")
        await vm.wait_heartbeats(1)
        before, t0 = vm.guest_progress()[0], time.perf_counter()
        await trio.sleep(RATE_WINDOW_S)
        writes_per_s = (vm.guest_progress()[0] - before) / (time.perf_counter() - t0)

        samples: dict[bool, list[tuple[float, float, int, bool]]] = {True: [], False: []}
        per_pass: list[tuple[int, ...]] = []
        for i in range(1 + reps):
            for live in (True, False):
                began = time.perf_counter()
                result = await rt.save("live", "Full", snap, mem, live=live)
                took = time.perf_counter() - began
                _remove(snap, mem)
                if i > 0 and live:
                    per_pass.append(result.bytes_per_pass)
                if i > 0:  # round 0 is the warm-up
                    samples[live].append(
                        (result.pause_ms, took, result.passes, result.pass_limit_reached)
                    )
        live_pause = _common.summarize([s[0] for s in samples[True]])
        stop_pause = _common.summarize([s[0] for s in samples[False]])
        return {
            "mem_mib": mem_mib,
            "live_pause_ms": live_pause.to_dict(),
            "stop_copy_pause_ms": stop_pause.to_dict(),
            "ratio": _common.ratio(live_pause.median, stop_pause.median),
            "live_save_s": _common.summarize([s[1] for s in samples[True]]).to_dict(),
            "stop_copy_save_s": _common.summarize([s[1] for s in samples[False]]).to_dict(),
            "passes": [s[2] for s in samples[True]],
            "pass_limit_reached": [s[3] for s in samples[True]],
            "live_bytes_per_pass": [list(b) for b in per_pass],
            "dirty_rate": {
                # One 8-byte write per page, cycling through the working set:
                # every write dirties a page (again, if the log was reset).
                "page_writes_per_s": round(writes_per_s),
                "working_set_mib": WORKING_SET_MIB,
            },
        }
    finally:
        await rt.aclose()


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("live_pause", "needs /dev/kvm")
    sizes = QUICK_SIZES_MIB if args.quick else SIZES_MIB

    async def run(directory: str) -> list[dict[str, Any]]:
        return [await _one_size(size, args.reps, directory) for size in sizes]

    with _common.scratch_dir() as directory:
        results = trio.run(run, directory)
    return {"sizes": results, "target_live_pause_p50_ms": 10.0,
            "machine": _common.machine_info()}  # fmt: skip


if __name__ == "__main__":
    _common.run_bench("live_pause", main, _common.parse_args(__doc__ or ""))
