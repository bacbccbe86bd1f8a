"""Pause acks and concurrent control calls on a real vCPU: the ack belongs to its request.

A pause consumer (``squibd.vm.quiesce.VcpuGate``) numbers its requests and,
in ``on_paused``, reads the number of the request in force. That is only
sound if ``on_paused`` runs before any later ``resume()`` or newer request
reaches the runner. The runner used to release its lock between parking
and calling ``on_paused``: a ``resume()`` plus the start of a newer request
(its number bumped, its ``request_pause()`` not yet made) could slip into
that gap, the callback then reported the newer number, and the thread ran
on through KVM_RUN: a quiesce could complete while that vCPU was running.

That gap lasts microseconds and no real schedule can be forced into it, so
the test that reproduces it swaps the runner's lock for an instrumented
one (a fake, named in the test) that runs the other thread's calls at the
first moment the vCPU thread lets go of the lock after acknowledging.
"""

from __future__ import annotations

import collections.abc
import threading
from typing import Any

import pytest

from squibd.kvm import VcpuRunner

from ._harness import DEADLINE_S, Machine

pytestmark = pytest.mark.kvm


class _LockRunningAHookOnRelease:
    """An ``RLock`` that runs ``hook`` once, in the releasing thread, the first
    time ``trigger()`` holds right after a thread let go of the lock entirely."""

    def __init__(
        self, trigger: collections.abc.Callable[[], bool], hook: collections.abc.Callable[[], None]
    ) -> None:
        self._lock = threading.RLock()
        self._trigger = trigger
        self._hook = hook
        self._fired = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()
        self._after_release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # threading.Condition uses these when the lock has them (RLock does).
    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]

    def _release_save(self) -> Any:
        state = self._lock._release_save()  # type: ignore[attr-defined]
        self._after_release()
        return state

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _after_release(self) -> None:
        if self._fired or self._is_owned() or not self._trigger():
            return
        self._fired = True
        self._hook()


@pytest.fixture
def counter1() -> collections.abc.Iterator[Machine]:
    machine = Machine.with_program("counter", 1)
    try:
        yield machine
    finally:
        machine.close()


def test_ack_is_not_reported_for_a_newer_request_forced_with_a_fake_lock(
    counter1: Machine,
) -> None:
    generation = [0]  # the consumer's request number, as VcpuGate keeps it
    issued: set[int] = set()  # numbers whose request_pause() was made
    reports: list[tuple[int, bool]] = []  # (number read in on_paused, issued then?)
    first_report = threading.Event()
    second_report = threading.Event()
    other_thread_done = threading.Event()

    def on_paused(index: int) -> None:
        reports.append((generation[0], generation[0] in issued))
        (second_report if first_report.is_set() else first_report).set()

    runner = VcpuRunner(counter1.vcpus[0], on_paused=on_paused)
    counter1.runners = [runner]

    def other_thread_calls() -> None:
        # What VcpuGate does from the trio thread: resume_all() (number 2), then
        # request_pause_all() bumps the number to 3 before calling request_pause().
        def calls() -> None:
            generation[0] = 2
            runner.resume()
            generation[0] = 3

        thread = threading.Thread(target=calls)
        thread.start()
        thread.join(DEADLINE_S)
        other_thread_done.set()

    def vcpu_thread_has_acked() -> bool:
        return threading.current_thread() is runner._thread and runner._pause_acked

    runner._cond = threading.Condition(
        _LockRunningAHookOnRelease(vcpu_thread_has_acked, other_thread_calls)  # type: ignore[arg-type]
    )
    runner.start()
    generation[0] = 1
    issued.add(1)
    runner.request_pause()
    assert first_report.wait(DEADLINE_S), "no pause ack"
    assert other_thread_done.wait(DEADLINE_S), "the instrumented lock never ran its hook"
    issued.add(3)
    runner.request_pause()
    assert second_report.wait(DEADLINE_S), "no ack of the second request"
    # Every ack reported the number of a request the runner had actually received.
    assert all(was_issued for _, was_issued in reports), reports
    assert reports[0] == (1, True)


def test_on_paused_may_resume_its_own_runner(counter1: Machine) -> None:
    """The callback runs under the runner's lock; the lock is re-entrant."""
    acks = threading.Event()
    runner = VcpuRunner(counter1.vcpus[0], on_paused=lambda i: (runner.resume(), acks.set()))
    counter1.runners = [runner]
    runner.start()
    runner.request_pause()
    assert acks.wait(DEADLINE_S)
    before = counter1.progress()
    after = counter1.wait_progress_above(before)  # resumed from inside on_paused
    assert after[0] > before[0]
