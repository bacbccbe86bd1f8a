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
