"""Digest cost per GiB: xxh3-64 vs BLAKE3, one and two threads (issue 3, Figures).

Baseline: copying the same GiB (numpy memcpy), so the ratio says how much a
digest adds relative to merely touching the bytes once. Chunks are 2 MiB,
as in the memory manifest. BLAKE3 is measured only when the optional
``blake3`` package is installed (squibd writes xxh3-64 by default).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import _common
import numpy as np

from squibd.snapshot.digest import available_algorithms, digest_function
from squibd.snapshot.manifest import DEFAULT_CHUNK_SIZE


def _hash_all(hash_of: Callable[[memoryview], bytes], view: memoryview, threads: int) -> None:
    chunks = [view[i : i + DEFAULT_CHUNK_SIZE] for i in range(0, len(view), DEFAULT_CHUNK_SIZE)]

    def work(part: list[memoryview]) -> None:
        for chunk in part:
            hash_of(chunk)

    if threads == 1:
        work(chunks)
        return
    workers = [threading.Thread(target=work, args=(chunks[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def main(args: Any) -> dict[str, Any]:
    size = (256 if args.quick else 1024) * _common.MIB
    source = np.empty(size, dtype=np.uint8)
    _common.fill_random(memoryview(source))
    target = np.empty_like(source)
    view = memoryview(source)
    gib = size / _common.GIB
    copy = _common.measure(lambda: np.copyto(target, source), reps=args.reps)
    result: dict[str, Any] = {
        "size_mib": size // _common.MIB,
        "baseline_copy_s_per_gib": copy.scaled(1 / gib),
        "algorithms": {},
    }
    for name in available_algorithms():
        hash_of = digest_function(name)
        per_threads = {}
        for threads in (1, 2):
            stats = _common.measure(lambda h=hash_of, t=threads: _hash_all(h, view, t),
                                    reps=args.reps)
            per_threads[f"threads_{threads}"] = {
                "s_per_gib": stats.scaled(1 / gib),
                "ratio_vs_copy": _common.ratio(stats.median, copy.median),
            }
        result["algorithms"][name] = per_threads
    result["chosen"] = "xxh3-64"
    result["digest_s_per_gib"] = result["algorithms"]["xxh3-64"]["threads_1"]["s_per_gib"]
    return result


if __name__ == "__main__":
    _common.run_bench("digest", main, _common.parse_args(__doc__ or ""))
