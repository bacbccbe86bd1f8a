"""Quiesce latency and state capture time of the VM runtime (issue 4, Figures).

Figures:
- ``quiesce_ms`` per vCPU count (1 and 2): ``Runtime.pause`` of a running
  ``counter`` guest (every vCPU asked to pause, all acks awaited in one trio
  cancel scope), p50/p99 over many pauses. Target p50 <= 1 ms, p99 <= 5 ms.
- baseline ``raw_pause_ms``: the same pause done directly on the runners from
  a plain thread (request_pause + a threading.Event per ack), no trio: the
  floor set by the signal, the KVM_RUN exit and thread wake-ups.
- ``capture_ms``: capture of VM-level and every vCPU's state of the paused VM.

Between samples the VM is resumed and given a few ms to re-enter the guest.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import _common
import trio

#: Pauses measured per vCPU count (p99 needs many samples).
SAMPLES = 300
QUICK_SAMPLES = 60
WARMUP = 20
#: Time given to the vCPUs to re-enter the guest after a resume (not timed).
SETTLE_S = 0.002
MEM_MIB = 64
#: Generous ack wait of the raw baseline (it never needs this long).
RAW_ACK_TIMEOUT_S = 5.0


def _raw_pause(vm: Any) -> float:
    """One pause of every vCPU straight on the runners; seconds."""
    acked = [threading.Event() for _ in vm._runners]
    original = [runner.on_paused for runner in vm._runners]
    for runner, event in zip(vm._runners, acked, strict=True):
        runner.on_paused = lambda index, e=event: e.set()
    try:
        t0 = time.perf_counter()
        for runner in vm._runners:
            runner.request_pause()
        for event in acked:
            if not event.wait(RAW_ACK_TIMEOUT_S):
                raise RuntimeError("a vCPU did not acknowledge the raw pause")
        return time.perf_counter() - t0
    finally:
        for runner, callback in zip(vm._runners, original, strict=True):
            runner.on_paused = callback
        for runner in vm._runners:
            runner.resume()


async def _one_count(vcpus: int, samples: int) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec
    from squibd.vm.runtime import Runtime

    rt = Runtime()
    try:
        vm = await rt.create_vm("q", vcpus, MEM_MIB, False, GuestSpec("counter"))
        await rt.start("q")
        await vm.wait_heartbeats(vcpus)
        pauses: list[float] = []
        captures: list[float] = []
        for i in range(WARMUP + samples):
            await trio.sleep(SETTLE_S)
            t0 = time.perf_counter()
            await rt.pause("q")
            elapsed = time.perf_counter() - t0
            t1 = time.perf_counter()
            await trio.to_thread.run_sync(vm.capture_state)
            captured = time.perf_counter() - t1
            await rt.resume("q")
            if i >= WARMUP:
                pauses.append(elapsed)
                captures.append(captured)
        raw: list[float] = []
        for i in range(WARMUP + samples):
            await trio.sleep(SETTLE_S)
            sample = await trio.to_thread.run_sync(_raw_pause, vm)
            if i >= WARMUP:
                raw.append(sample)
        quiesce = _common.summarize(pauses).scaled(1000)
        baseline = _common.summarize(raw).scaled(1000)
        return {
            "vcpus": vcpus,
            "quiesce_ms": quiesce.to_dict(p99=True),
            "raw_pause_ms": baseline.to_dict(p99=True),
            "ratio_p50": _common.ratio(quiesce.median, baseline.median),
            "capture_ms": _common.summarize(captures).scaled(1000).to_dict(p99=True),
        }
    finally:
        await rt.aclose()


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("quiesce", "needs /dev/kvm")
    samples = QUICK_SAMPLES if args.quick else SAMPLES

    async def run() -> list[dict[str, Any]]:
        return [await _one_count(vcpus, samples) for vcpus in (1, 2)]

    counts = trio.run(run)
    return {
        "by_vcpus": counts,
        "targets": {"p50_ms": 1.0, "p99_ms": 5.0},
        "machine": _common.machine_info(),
    }


if __name__ == "__main__":
    _common.run_bench("quiesce", main, _common.parse_args(__doc__ or ""))
