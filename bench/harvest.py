"""Dirty-bitmap harvest + run coalescing for a 4 GiB slot (issue 3, Figures).

``harvest_ms``: ``DirtyBitmap.merge_kvm`` of a KVM-style log (1,048,576 pages
of 4 KiB = 16,384 words) followed by ``snapshot_run_table`` (coalesced runs as
an array, what ``write_memory`` takes; ``harvest_as_tuple_list_ms`` is the same
with ``snapshot_runs``, a list of Python tuples), for
three patterns: 1% scattered pages, 10% in 64-page clusters, 100% dirty.
Baseline: the same decode in pure Python (loop over words and bits).
Target: <= 5 ms. When /dev/kvm is usable, the real ``KVM_GET_DIRTY_LOG`` of a
4 GiB slot (no vCPU, so an empty log) is timed too, via ``squibd.kvm``.
"""

from __future__ import annotations

from typing import Any

import _common
import numpy as np

from squibd.snapshot.bitmap import HOST_PAGE_SIZE, WORD_BITS, DirtyBitmap

SLOT_BYTES = 4 * _common.GIB
SEED = 7
CLUSTER_PAGES = 64


def _pattern(name: str, npages: int, rng: np.random.Generator) -> np.ndarray[Any, Any]:
    bits = np.zeros(npages, dtype=bool)
    if name == "scattered_1pct":
        bits[rng.choice(npages, size=npages // 100, replace=False)] = True
    elif name == "clustered_10pct":
        clusters = npages // CLUSTER_PAGES
        for start in rng.choice(clusters, size=clusters // 10, replace=False).tolist():
            bits[start * CLUSTER_PAGES : (start + 1) * CLUSTER_PAGES] = True
    else:
        bits[:] = True
    packed = np.packbits(bits, bitorder="little")
    return np.frombuffer(packed.tobytes(), dtype="<u8").astype(np.uint64)


def _python_runs(words: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for index, word in enumerate(words):
        if not word:
            continue
        for bit in range(WORD_BITS):
            if word >> bit & 1:
                page = index * WORD_BITS + bit
                if runs and runs[-1][0] + runs[-1][1] == page:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                else:
                    runs.append((page, 1))
    return runs


def _kvm_get_ms(reps: int) -> Any:
    if not _common.kvm_available():
        return None
    try:
        from squibd.kvm.system import Kvm
        from squibd.kvm.vm import KvmVm
        from squibd.snapshot.manifest import MemoryRegion
        from squibd.vm.memory import GuestMemory
    except ImportError:
        return None
    kvm = Kvm.open()
    try:
        with KvmVm.create(kvm) as vm, GuestMemory.shared((MemoryRegion(0, SLOT_BYTES, 0),)) as mem:
            region = mem.regions[0]
            vm.set_memory_region(0, 0, region.size, region.host_addr, log_dirty=True)
            bitmap = DirtyBitmap(region.size)
            stats = _common.measure(
                lambda: (bitmap.merge_kvm(vm.harvest_dirty_log(0)), bitmap.snapshot_runs()),
                reps=reps,
            )
            return stats.scaled(1000)
    finally:
        kvm.close()


def main(args: Any) -> dict[str, Any]:
    npages = SLOT_BYTES // HOST_PAGE_SIZE
    rng = np.random.default_rng(SEED)
    patterns: dict[str, Any] = {}
    for name in ("scattered_1pct", "clustered_10pct", "all_100pct"):
        log = _pattern(name, npages, rng)
        bitmap = DirtyBitmap(SLOT_BYTES)

        def harvest(b: DirtyBitmap = bitmap, words: Any = log) -> None:
            b.clear()
            b.merge_kvm(words)
            b.snapshot_run_table()

        def harvest_list(b: DirtyBitmap = bitmap, words: Any = log) -> None:
            b.clear()
            b.merge_kvm(words)
            b.snapshot_runs()

        ours = _common.measure(harvest, reps=max(args.reps, 20)).scaled(1000)
        as_tuples = _common.measure(harvest_list, reps=max(args.reps, 20)).scaled(1000)
        as_list = log.tolist()
        baseline = _common.measure(lambda w=as_list: _python_runs(w), reps=args.reps).scaled(1000)
        bitmap.clear()
        bitmap.merge_kvm(log)
        runs = bitmap.snapshot_runs()
        assert runs == _python_runs(as_list)
        patterns[name] = {
            "harvest_ms": ours,
            "harvest_as_tuple_list_ms": as_tuples,
            "baseline_python_ms": baseline,
            "ratio": _common.ratio(ours.median, baseline.median),
            "runs": len(runs),
        }
    return {
        "slot_gib": SLOT_BYTES // _common.GIB,
        "pages": npages,
        "patterns": patterns,
        "harvest_ms": patterns["scattered_1pct"]["harvest_ms"],
        "worst_harvest_ms": max(p["harvest_ms"].median for p in patterns.values()),
        "kvm_get_dirty_log_plus_runs_ms": _kvm_get_ms(args.reps),
    }


if __name__ == "__main__":
    _common.run_bench("harvest", main, _common.parse_args(__doc__ or ""))
