"""The quiesce gate's bookkeeping, with runner threads faked to inject late acks.

The real runners (tests/vm/test_lifecycle.py) cannot be made to acknowledge
an abandoned pause request after a newer one started; these fakes can.
"""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from squibd.snapshot.errors import QuiesceTimeout
from squibd.vm.quiesce import VcpuGate, quiesce


class FakeRunnerWithManualAcks:
    """A runner whose pause acks are sent by the test, from a real thread."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.pause_requests = 0
        self.resumes = 0
        self.gate: VcpuGate | None = None

    def request_pause(self) -> None:
        self.pause_requests += 1

    def resume(self) -> None:
        self.resumes += 1

    def ack_from_thread(self) -> None:
        assert self.gate is not None
        thread = threading.Thread(target=self.gate.on_paused_from_thread, args=(self.index,))
        thread.start()
        thread.join()


def _gate(count: int) -> tuple[VcpuGate, list[FakeRunnerWithManualAcks]]:
    gate = VcpuGate(count, trio.lowlevel.current_trio_token())
    runners = [FakeRunnerWithManualAcks(i) for i in range(count)]
    for runner in runners:
        runner.gate = gate
    gate.attach(runners)
    return gate, runners


async def test_all_acks_complete_the_quiesce() -> None:
    gate, runners = _gate(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(quiesce, gate, 60.0)
        await trio.testing.wait_all_tasks_blocked()
        assert [r.pause_requests for r in runners] == [1, 1]
        for runner in runners:
            runner.ack_from_thread()
    assert gate.paused == {0, 1}
    assert [r.resumes for r in runners] == [0, 0]


async def test_timeout_resumes_every_vcpu() -> None:
    gate, runners = _gate(2)
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            with pytest.raises(QuiesceTimeout) as caught:
                await quiesce(gate, 0.05)
            assert "[1]" in str(caught.value.detail)

        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        runners[0].ack_from_thread()
    assert [r.resumes for r in runners] == [1, 1]
    assert gate.paused == frozenset()


async def test_a_late_ack_of_an_abandoned_request_does_not_complete_a_new_one() -> None:
    gate, runners = _gate(1)
    with pytest.raises(QuiesceTimeout):
        await quiesce(gate, 0.01)
    async with trio.open_nursery() as nursery:
        done = trio.Event()

        async def second() -> None:
            await quiesce(gate, 60.0)
            done.set()

        # The ack of the first request arrives (queued) before the second starts.
        runners[0].ack_from_thread()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        runners[0].ack_from_thread()
    assert done.is_set()
