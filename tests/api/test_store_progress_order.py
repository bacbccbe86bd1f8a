"""``$/progress`` of store.push/pull: ``done`` never goes back.

Regression: the store's worker threads report concurrently, and a pull was
seen reporting 1101824 then 4096 bytes done (a late report of an earlier figure).
"""

from __future__ import annotations

import trio
import trio.testing

from squibd.api.store_handlers import _thread_progress


async def test_late_smaller_reports_from_threads_are_dropped() -> None:
    seen: list[tuple[str, int, int]] = []
    report = _thread_progress(lambda *args: seen.append(args), "pull")
    assert report is not None

    def worker() -> None:  # what racing threads deliver: out of order
        for done in (4096, 1101824, 4096, 3198976, 3198976, 8441856):
            report(done, 8441856)

    await trio.to_thread.run_sync(worker)
    await trio.testing.wait_all_tasks_blocked()
    assert [done for _, done, _ in seen] == [4096, 1101824, 3198976, 3198976, 8441856]
    assert {phase for phase, _, _ in seen} == {"pull"}


def test_the_store_meter_reports_growing_figures_from_racing_threads() -> None:
    import threading

    from squibd.store.store import _Throttle

    seen: list[int] = []
    meter = _Throttle(lambda done, total: seen.append(done), 64 * 4096)
    workers = [threading.Thread(target=lambda: [meter.add(4096) for _ in range(16)])
               for _ in range(4)]  # fmt: skip
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert seen == sorted(seen) and seen[-1] == 64 * 4096
