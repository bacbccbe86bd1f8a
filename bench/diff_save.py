"""Durable Diff memory-file writes (issue 3, Figures).

A 4 GiB memfd guest with 1% of its pages dirty, scattered single 4 KiB pages
(random, seeded). squibd: ``write_memory`` of the dirty runs (digests
included) + ``fsync``; baseline: plain ``pwrite`` of the same runs from the
mapping + ``fsync``, one thread, no digests. Targets: ratio <= 1.3, and the
write without fsync under 50 ms. Runs are interleaved round-robin (noisy host).
"""

from __future__ import annotations

import os
from typing import Any

import _common
import numpy as np

from squibd.snapshot.bitmap import HOST_PAGE_SIZE, DirtyBitmap
from squibd.snapshot.memwriter import write_memory
from squibd.vm.memory import GuestMemory, GuestRegion

#: Issue 3: 1% of the pages dirty.
DIRTY_FRACTION = 0.01
SEED = 20261127


def _pwrite_runs(fd: int, region: GuestRegion, runs: Any) -> None:
    for first, count in runs.tolist():
        start, length = first * HOST_PAGE_SIZE, count * HOST_PAGE_SIZE
        with region.view[start : start + length] as piece:
            done = 0
            while done < length:
                done += os.pwrite(fd, piece[done:], region.file_offset + start + done)


def main(args: Any) -> dict[str, Any]:
    mem_mib = 256 if args.quick else 4096
    rng = np.random.default_rng(SEED)
    samples: dict[str, list[float]] = {"diff_save_s": [], "write_only_s": [], "baseline_s": [],
                                       "baseline_write_only_s": []}
    with GuestMemory.create(mem_mib) as memory, _common.scratch_dir() as directory:
        runs_per_region = []
        dirty_pages = 0
        for region in memory.regions:
            npages = region.size // HOST_PAGE_SIZE
            pages = rng.choice(npages, size=int(npages * DIRTY_FRACTION), replace=False)
            bitmap = DirtyBitmap(region.size)
            bitmap.mark_page_array(pages)
            runs_per_region.append(bitmap.snapshot_run_table())
            dirty_pages += len(pages)
            for page in pages.tolist():  # touch with non-zero content
                region.view[page * HOST_PAGE_SIZE : page * HOST_PAGE_SIZE + 8] = b"\xa5" * 8
        path = os.path.join(directory, "diff.mem")

        def squibd(fd: int) -> float:
            with _common.Stopwatch() as watch:
                write_memory(fd, memory.regions, kind="Diff", runs_per_region=runs_per_region)
            return watch.seconds

        def baseline(fd: int) -> float:
            with _common.Stopwatch() as watch:
                for region, runs in zip(memory.regions, runs_per_region, strict=True):
                    _pwrite_runs(fd, region, runs)
                os.ftruncate(fd, memory.total_size)
            return watch.seconds

        for round_index in range(1 + args.reps):
            for name, run in (("diff_save_s", squibd), ("baseline_s", baseline)):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    with _common.Stopwatch() as total:
                        write_only = run(fd)
                        os.fsync(fd)
                finally:
                    os.close(fd)
                    os.unlink(path)
                if round_index:
                    samples[name].append(total.seconds)
                    key = "write_only_s" if name == "diff_save_s" else "baseline_write_only_s"
                    samples[key].append(write_only)
    stats = {name: _common.summarize(values) for name, values in samples.items()}
    return {
        "mem_mib": mem_mib,
        "dirty_pages": dirty_pages,
        "runs": sum(int(r.shape[0]) for r in runs_per_region),
        **stats,
        "write_only_ms": stats["write_only_s"].scaled(1000),
        "ratio": _common.ratio(stats["diff_save_s"].median, stats["baseline_s"].median),
        "write_only_ratio": _common.ratio(stats["write_only_s"].median,
                                          stats["baseline_write_only_s"].median),
    }


if __name__ == "__main__":
    _common.run_bench("diff_save", main, _common.parse_args(__doc__ or ""))
