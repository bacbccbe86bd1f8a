"""The quiesce and live-pause fast paths across the VM-process boundary (real KVM).

VMM protocol revision 1 (a pause that harvests, a capture pipelined behind
it), trio reading the VM socket itself, the control thread's priority.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import trio

from squibd.kvm.guest import PROGRESS_BASE
from squibd.vm.models import GuestSpec
from squibd.vm.remote import RemoteVm
from squibd.vm.runtime import Runtime
from squibd.vmm.host import RequestFailed
from squibd.vmm.process import CONTROL_NICE
from squibd.vmm.protocol import REVISION, unpack_dirty_words
from tests.vm._helpers import wait_progress_beyond

pytestmark = pytest.mark.kvm

WAIT_S = 60.0
_PROGRESS_PAGE = PROGRESS_BASE // 4096


def _bit(words: list[np.ndarray], page: int) -> bool:
    return bool((int(words[0][page // 64]) >> (page % 64)) & 1)


async def _counter(rt: Runtime, vm_id: str, vcpus: int, track: bool) -> RemoteVm:
    vm = await rt.create_vm(vm_id, vcpus, 64, track, GuestSpec("counter"))
    assert isinstance(vm, RemoteVm)
    await rt.start(vm_id)
    await wait_progress_beyond(vm, [0] * vcpus)
    return vm


async def _save_pause(vm: RemoteVm) -> None:
    """Pause as a save does (the runtime marks the VM busy): the pause prefetches."""
    vm.busy = "test"
    try:
        await vm.pause()
    finally:
        vm.busy = None


async def test_pause_harvests_and_answers_the_capture_pipelined_behind_it() -> None:
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await _counter(rt, "p", 1, True)
        assert vm.revision == REVISION >= 1
        conn = vm._conn
        await trio.to_thread.run_sync(lambda: conn.call("harvest"))  # reset the log
        await wait_progress_beyond(vm, vm.guest_progress())  # written since
        pause = conn.begin("pause", on_trio=True, harvest=True)
        capture = conn.begin("capture")  # sent before the vCPUs parked: answered after
        with trio.fail_after(WAIT_S):
            paused = await pause.await_result()
        words = [unpack_dirty_words(item) for item in paused["dirty"]]
        assert len(words[0]) == 64 * 1024 * 1024 // 4096 // 64  # the whole region's bitmap
        assert _bit(words, _PROGRESS_PAGE)  # the counter wrote its progress page
        pipelined = await trio.to_thread.run_sync(capture.wait)
        again = await trio.to_thread.run_sync(lambda: conn.call("capture"))
        for field in ("regs", "sregs", "xsave"):  # parked all along (the clocks move on)
            assert pipelined["vcpu_states"][0][field] == again["vcpu_states"][0][field]
        # The pause reset the log: nothing ran since, so a harvest finds nothing.
        after = await trio.to_thread.run_sync(lambda: conn.call("harvest", sparse=True))
        assert not any(unpack_dirty_words(item).any() for item in after["dirty"])
        conn.send("resume")
        await wait_progress_beyond(vm, vm.guest_progress())
    finally:
        await rt.aclose()


async def test_a_resume_answers_the_pause_and_the_pipelined_capture_it_overtakes() -> None:
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await _counter(rt, "s", 2, False)
        await trio.to_thread.run_sync(lambda: vm.arm_stall(1))
        assert await trio.to_thread.run_sync(lambda: vm.wait_stalled(1, WAIT_S))
        conn = vm._conn
        pause = conn.begin("pause", on_trio=True)  # vCPU 1 is held: never completes
        capture = conn.begin("capture")
        conn.send("resume")
        with pytest.raises(RequestFailed) as paused:
            await pause.await_result()
        assert paused.value.kind == "PauseAbandoned"
        with pytest.raises(RequestFailed) as captured:
            await trio.to_thread.run_sync(capture.wait)
        assert captured.value.kind == "PauseAbandoned"
        await trio.to_thread.run_sync(lambda: vm.release_stall(1))
        await wait_progress_beyond(vm, vm.guest_progress())
    finally:
        await rt.aclose()


async def test_words_a_save_pause_harvested_survive_a_resume() -> None:
    """A pause during a save harvests in the process; resumed before the save's
    harvest, those words still reach the dirty set (the KVM log was reset)."""
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await _counter(rt, "w", 1, True)
        await trio.to_thread.run_sync(vm.harvest_kvm)
        vm.dirty.clear(vm.dirty.words())
        await wait_progress_beyond(vm, vm.guest_progress())  # written since
        await _save_pause(vm)
        # Hold the vCPU before it runs again: the guest writes nothing after the resume.
        await trio.to_thread.run_sync(lambda: vm.arm_stall(0))
        vm.resume()
        assert await trio.to_thread.run_sync(lambda: vm.wait_stalled(0, WAIT_S))
        harvested = await trio.to_thread.run_sync(vm.harvest_kvm)
        assert _bit(harvested, _PROGRESS_PAGE)
        assert _bit(vm.dirty.words(), _PROGRESS_PAGE)
        # The capture pipelined behind that pause was voided by the resume: a
        # capture now asks the process again (and still succeeds).
        await trio.to_thread.run_sync(lambda: vm.release_stall(0))
        await vm.pause()
        state = await trio.to_thread.run_sync(vm.capture_state)
        assert len(state.vcpu_states) == 1
        vm.resume()
    finally:
        await rt.aclose()


async def test_a_blocking_call_on_the_trio_thread_is_answered() -> None:
    """Trio's own task reads the VM socket; a blocking call made on trio's
    thread (tests do) reads it itself meanwhile instead of waiting forever."""
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await _counter(rt, "t", 1, False)
        pending = vm._conn.begin("wait_heartbeats", on_trio=True, count=1)
        assert vm._conn.call("describe")["pid"] == vm.process_id  # blocks this thread
        with trio.fail_after(WAIT_S):
            await pending.await_result()  # answered while either reader read
    finally:
        await rt.aclose()


async def test_a_save_pause_prefetches_harvest_and_state_that_the_save_then_takes() -> None:
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await _counter(rt, "c", 2, True)
        await trio.to_thread.run_sync(vm.harvest_kvm)
        await wait_progress_beyond(vm, vm.guest_progress())  # written since
        await _save_pause(vm)
        prefetched = vm._prefetched_capture
        assert prefetched is not None and vm._prefetched_words is not None
        state = await trio.to_thread.run_sync(vm.capture_state)
        assert state is prefetched.converted  # converted as it arrived, no new request
        assert len(state.vcpu_states) == 2
        harvested = await trio.to_thread.run_sync(vm.harvest_kvm)
        assert _bit(harvested, _PROGRESS_PAGE)
        assert vm._prefetched_words is None  # taken once
        vm.resume()
        await wait_progress_beyond(vm, vm.guest_progress())
    finally:
        await rt.aclose()


async def test_the_ready_answers_of_a_save_pause_need_no_thread_and_lapse_on_resume() -> None:
    """What the live save's final pass takes on trio's thread (``live.py``)."""
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await _counter(rt, "r", 1, True)
        await trio.to_thread.run_sync(vm.harvest_kvm)
        await wait_progress_beyond(vm, vm.guest_progress())  # written since
        assert vm.harvest_kvm_ready() is None and vm.capture_ready() is None  # nothing prefetched
        await _save_pause(vm)
        words = vm.harvest_kvm_ready()
        assert words is not None and _bit(words, _PROGRESS_PAGE)
        assert _bit(vm.dirty.words(), _PROGRESS_PAGE)  # merged into the dirty set
        assert vm.harvest_kvm_ready() is None  # taken once
        pending = vm._prefetched_capture
        assert pending is not None
        await trio.to_thread.run_sync(pending.thread_event.wait)
        state = vm.capture_ready()
        assert state is not None and state is pending.converted
        await _save_pause(vm)  # again, while parked (the runtime would refuse; the VM does not)
        vm.resume()
        assert vm.harvest_kvm_ready() is None and vm.capture_ready() is None  # lapsed
    finally:
        await rt.aclose()


def _thread_nice(pid: int, tid: str) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[16])  # field 19 of stat(5), counted from field 3 here


async def test_only_the_control_thread_runs_at_the_raised_priority() -> None:
    if os.geteuid() != 0:
        pytest.skip("raising a thread's priority needs CAP_SYS_NICE")
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await _counter(rt, "n", 2, True)
        await _save_pause(vm)
        await trio.to_thread.run_sync(vm.capture_state)
        pid = vm.process_id
        nices = {tid: _thread_nice(pid, tid) for tid in os.listdir(f"/proc/{pid}/task")}
        assert nices.pop(str(pid)) == CONTROL_NICE  # the main thread
        assert len(nices) >= 3 and set(nices.values()) == {0}  # vCPUs, collector among them
        vm.resume()
    finally:
        await rt.aclose()
