"""Durable Full memory-file writes (issue 3, Figures).

Figures:
- ``full_1gib``: a durable Full of 1 GiB of touched memfd memory with
  ``write_memory`` (each write method, 1 and 2 writers; digests included)
  vs the baseline: raw ``pwrite`` of the same bytes from the mapping in
  8 MiB calls + ``fsync``, one thread, no digests. Target ratio <= 1.10.
- ``sparse``: a durable Full of a 4 GiB memfd with 10% touched vs 100%
  touched (default writers and method). Target ratio <= 0.15.

Each run writes a fresh file in a scratch directory on the ext4 root
(``$SQUIBD_BENCH_TMP``, default /var/tmp) and deletes it untimed.
"""

from __future__ import annotations

import os
from typing import Any

import _common

from squibd.snapshot.memwriter import DEFAULT_METHOD, DEFAULT_WRITERS, WRITE_METHODS, write_memory
from squibd.vm.memory import GuestMemory

#: Baseline write size per pwrite call.
BASELINE_BLOCK = 8 * _common.MIB
#: Touched fraction of the sparse figure (issue 3: 10%).
SPARSE_FRACTION = 0.10


class _Target:
    """A fresh output file per run (created in setup, removed in teardown)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "bench.mem")
        self.fd = -1

    def setup(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)

    def teardown(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def _squibd_full(memory: GuestMemory, target: _Target, method: str, writers: int) -> None:
    write_memory(target.fd, memory.regions, kind="Full", writers=writers, method=method)
    os.fsync(target.fd)


def _baseline(memory: GuestMemory, target: _Target) -> None:
    for region in memory.regions:
        offset = 0
        while offset < region.size:
            end = min(offset + BASELINE_BLOCK, region.size)
            with region.view[offset:end] as piece:
                done = 0
                while done < len(piece):
                    done += os.pwrite(target.fd, piece[done:], region.file_offset + offset + done)
            offset = end
    os.ftruncate(target.fd, memory.total_size)
    os.fsync(target.fd)


def _touch(memory: GuestMemory, fraction: float) -> None:
    """Fill ``fraction`` of every region with random bytes, spread in 2 MiB stripes."""
    stripe = 2 * _common.MIB
    for region in memory.regions:
        stripes = region.size // stripe
        chosen = range(0, stripes, max(1, round(1 / fraction))) if fraction < 1 else range(stripes)
        for index in chosen:
            with region.view[index * stripe : (index + 1) * stripe] as piece:
                _common.fill_random(piece)


def _interleaved(runs: dict[str, Any], target: _Target, reps: int) -> dict[str, Any]:
    """Time every callable of ``runs`` round-robin, rotating the order (the host is
    noisy: no config gets a quiet or a busy stretch to itself); one warm-up round."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(1 + reps):
        # Rotate the order each round so that no config always follows the same one.
        for name in names[round_index % len(names) :] + names[: round_index % len(names)]:
            run = runs[name]
            target.setup()
            try:
                with _common.Stopwatch() as watch:
                    run()
            finally:
                target.teardown()
            if round_index:
                samples[name].append(watch.seconds)
    return {name: _common.summarize(values) for name, values in samples.items()}


def main(args: Any) -> dict[str, Any]:
    full_mib = 256 if args.quick else 1024
    sparse_mib = 512 if args.quick else 4096
    result: dict[str, Any] = {"full_mib": full_mib, "sparse_mib": sparse_mib}
    default_name = f"{DEFAULT_METHOD}_w{DEFAULT_WRITERS}"
    with _common.scratch_dir() as directory:
        target = _Target(directory)
        with GuestMemory.create(full_mib) as memory:
            _touch(memory, 1.0)
            runs: dict[str, Any] = {"baseline": lambda: _baseline(memory, target)}
            # --quick measures only the default; the full run compares every primitive.
            methods = (DEFAULT_METHOD,) if args.quick else WRITE_METHODS
            for method in methods:
                for writers in (DEFAULT_WRITERS,) if args.quick else (1, 2):
                    runs[f"{method}_w{writers}"] = (
                        lambda m=method, w=writers: _squibd_full(memory, target, m, w)
                    )
            stats = _interleaved(runs, target, args.reps)
            baseline = stats.pop("baseline")
            configs = {
                name: {"s": value, "ratio": _common.ratio(value.median, baseline.median)}
                for name, value in stats.items()
            }
            result["full_1gib"] = {
                "baseline_s": baseline,
                "configs": configs,
                "default": default_name,
                "full_save_s": configs[default_name]["s"],
                "ratio": configs[default_name]["ratio"],
            }
        memories = {}
        try:
            for name, fraction in (("touched_10pct_s", SPARSE_FRACTION), ("touched_100pct_s", 1.0)):
                memories[name] = GuestMemory.create(sparse_mib)
                _touch(memories[name], fraction)
            sparse = _interleaved(
                {name: (lambda m=memory: _squibd_full(m, target, DEFAULT_METHOD, DEFAULT_WRITERS))
                 for name, memory in memories.items()},
                target, args.reps,
            )
        finally:
            for memory in memories.values():
                memory.close()
        result["sparse"] = {
            **sparse,
            "full_save_sparse_ratio": _common.ratio(sparse["touched_10pct_s"].median,
                                                    sparse["touched_100pct_s"].median),
        }
    result["full_save_s"] = result["full_1gib"]["full_save_s"]
    result["ratio_vs_pwrite_fsync"] = result["full_1gib"]["ratio"]
    result["full_save_sparse_ratio"] = result["sparse"]["full_save_sparse_ratio"]
    return result


if __name__ == "__main__":
    _common.run_bench("memory_save", main, _common.parse_args(__doc__ or ""))
