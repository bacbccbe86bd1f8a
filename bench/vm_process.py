"""One VM, one process (issue 11): VM processes against the in-process runtime, same run.

Figures (each for ``vm_isolation = "process"`` and ``"inprocess"``, with ratios):
- ``load_to_running_ms``: ``Runtime.load`` of a 1 GiB Full pair, File backend,
  with ``resume_vm`` (the VM process comes from the warm zygote). Target <= 20 ms.
- ``quiesce_ms``: ``Runtime.pause`` of a running 2-vCPU ``counter`` guest,
  p50/p99 (target p50 <= 1 ms, p99 <= 5 ms across the process boundary).
- ``live_pause_ms``: pause of ``save(Full, live=True)`` of a ``memwriter``
  guest (64 MiB working set) at 1 and 4 GiB (target p50 <= 10 ms). Untouched
  RAM stays holes here (the pause depends on the dirty working set).
- ``progress_per_s``: total guest progress (``counter``, 1 vCPU per VM) of 1
  and 2 VMs running at once, measured over a fixed window.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any

import _common
import trio

MODES = ("process", "inprocess")
QUIESCE_SAMPLES = 300
QUICK_QUIESCE_SAMPLES = 60
WARMUP = 20
SETTLE_S = 0.002
LIVE_SIZES_MIB = (1024, 4096)
QUICK_LIVE_SIZES_MIB = (256,)
WINDOW_S = 1.0


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


async def _runtime(mode: str) -> Any:
    from squibd.vm.runtime import Runtime

    rt = Runtime(vm_isolation=mode, quiesce_timeout_s=5.0)
    await rt.reattach()  # starts the warm zygote (no state dir: nothing to re-attach)
    return rt


async def _load(mode: str, reps: int, directory: str) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec, MemBackend

    snap, mem = os.path.join(directory, "g.snap"), os.path.join(directory, "g.mem")
    rt = await _runtime(mode)
    try:
        vm = await rt.create_vm("src", 1, 1024, False, GuestSpec("counter"))
        await rt.start("src")
        await vm.wait_heartbeats(1)
        await rt.save("src", "Full", snap, mem)
        await rt.destroy("src")
        samples = []
        for i in range(1 + reps):
            t0 = time.perf_counter()
            await rt.load("l", snap, MemBackend("File", mem), resume_vm=True)
            took = time.perf_counter() - t0
            await rt.destroy("l")
            if i > 0:
                samples.append(took)
        return _common.summarize(samples).scaled(1000).to_dict()
    finally:
        await rt.aclose()
        _remove(snap, mem)


async def _quiesce(mode: str, samples: int) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec

    rt = await _runtime(mode)
    try:
        vm = await rt.create_vm("q", 2, 64, False, GuestSpec("counter"))
        await rt.start("q")
        await vm.wait_heartbeats(2)
        pauses = []
        for i in range(WARMUP + samples):
            await trio.sleep(SETTLE_S)
            t0 = time.perf_counter()
            await rt.pause("q")
            elapsed = time.perf_counter() - t0
            await rt.resume("q")
            if i >= WARMUP:
                pauses.append(elapsed)
        return _common.summarize(pauses).scaled(1000).to_dict(p99=True)
    finally:
        await rt.aclose()


async def _live(mode: str, mem_mib: int, reps: int, directory: str) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec

    snap, mem = os.path.join(directory, "l.snap"), os.path.join(directory, "l.mem")
    rt = await _runtime(mode)
    try:
        guest = GuestSpec("memwriter", {"working_set_mib": 64, "stride_pages": 1})
        vm = await rt.create_vm("live", 1, mem_mib, False, guest)
        await rt.start("live")
        await vm.wait_heartbeats(1)
        pauses = []
        for i in range(1 + reps):
            result = await rt.save("live", "Full", snap, mem, live=True)
            _remove(snap, mem)
            if i > 0:
                pauses.append(result.pause_ms)
        return _common.summarize(pauses).to_dict()
    finally:
        await rt.aclose()
        _remove(snap, mem)


async def _progress(mode: str, vms: int) -> float:
    from squibd.vm.models import GuestSpec

    rt = await _runtime(mode)
    try:
        handles = [
            await rt.create_vm(f"p{i}", 1, 64, False, GuestSpec("counter")) for i in range(vms)
        ]
        for i, vm in enumerate(handles):
            await rt.start(f"p{i}")
            await vm.wait_heartbeats(1)
        before = [vm.guest_progress()[0] for vm in handles]
        t0 = time.perf_counter()
        await trio.sleep(WINDOW_S)
        after = [vm.guest_progress()[0] for vm in handles]
        took = time.perf_counter() - t0
        return sum(a - b for a, b in zip(after, before, strict=True)) / took
    finally:
        await rt.aclose()


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("vm_process", "needs /dev/kvm")
    samples = QUICK_QUIESCE_SAMPLES if args.quick else QUIESCE_SAMPLES
    sizes = QUICK_LIVE_SIZES_MIB if args.quick else LIVE_SIZES_MIB

    async def run() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with tempfile.TemporaryDirectory(dir=os.environ.get("SQUIBD_BENCH_DIR")) as directory:
            for mode in MODES:
                _common.log(f"{mode}: load, quiesce, live pause, progress")
                out[mode] = {
                    "load_to_running_ms": await _load(mode, args.reps, directory),
                    "quiesce_ms": await _quiesce(mode, samples),
                    "live_pause_ms": {
                        str(size): await _live(mode, size, args.reps, directory)
                        for size in sizes
                    },
                    "progress_per_s": {
                        str(n): round(await _progress(mode, n)) for n in (1, 2)
                    },
                }
        return out

    result = trio.run(run)
    proc, inproc = result["process"], result["inprocess"]
    ratios = {
        "load_p50": _common.ratio(proc["load_to_running_ms"]["median"],
                                  inproc["load_to_running_ms"]["median"]),
        "quiesce_p50": _common.ratio(proc["quiesce_ms"]["median"],
                                     inproc["quiesce_ms"]["median"]),
        "progress_2_vms": _common.ratio(proc["progress_per_s"]["2"],
                                        inproc["progress_per_s"]["2"]),
        "scaling_process_2_over_1": _common.ratio(proc["progress_per_s"]["2"],
                                                  proc["progress_per_s"]["1"]),
        "scaling_inprocess_2_over_1": _common.ratio(inproc["progress_per_s"]["2"],
                                                    inproc["progress_per_s"]["1"]),
    }  # fmt: skip
    return {
        **result,
        "ratios_process_over_inprocess": ratios,
        "targets": {"load_ms": 20.0, "quiesce_p50_ms": 1.0, "quiesce_p99_ms": 5.0,
                    "live_pause_p50_ms": 10.0},
        "machine": _common.machine_info(),
    }  # fmt: skip


if __name__ == "__main__":
    _common.run_bench("vm_process", main, _common.parse_args(__doc__ or ""))
