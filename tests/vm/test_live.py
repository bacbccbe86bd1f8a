"""Live saves (issue 6): pre-copy passes while a memwriter guest writes, short pause."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from squibd.snapshot.envelope import read_state_file
from squibd.snapshot.errors import MemoryIo, QuiesceTimeout
from squibd.snapshot.verify import verify
from squibd.vm.errors import DiffNotAllowed
from squibd.vm.machine import Vm
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime

from ._helpers import first_memory_difference, rebase_full_and_diff, wait_progress_beyond

pytestmark = pytest.mark.kvm

MEM_MIB = 128
WRITER = GuestSpec("memwriter", {"working_set_mib": 16, "stride_pages": 1})
#: memwriter counts one write per page: past this, each vCPU has touched the whole set.
WORKING_SET_PAGES = 16 * 1024 * 1024 // 4096
#: More than the 4 MiB ``small_tmpfs`` holds.
OVER_TMPFS = 5 * 1024 * 1024


async def _running_writer(runtime: Runtime, vm_id: str, *, track: bool = True) -> Vm:
    vm = await runtime.create_vm(vm_id, 2, MEM_MIB, track, WRITER)
    await runtime.start(vm_id)
    # The whole working set exists before a save starts (a Full writes touched RAM only).
    await wait_progress_beyond(vm, [WORKING_SET_PAGES, WORKING_SET_PAGES])
    return vm


async def test_live_full_equals_memory_at_the_pause_and_restores(
    runtime: Runtime, tmp_path: Path
) -> None:
    vm = await _running_writer(runtime, "live")
    snap, mem = tmp_path / "l.snap", tmp_path / "l.mem"
    result = await runtime.save("live", "Full", str(snap), str(mem), live=True, resume=False)
    assert runtime.describe("live").state == "Paused"
    assert result.live and result.passes >= 2
    assert len(result.bytes_per_pass) == result.passes
    assert result.bytes_per_pass[0] >= 16 * 1024 * 1024  # pass 1: the whole working set
    assert result.pause_ms > 0
    assert first_memory_difference(str(mem), vm) is None
    verify(read_state_file(str(snap)), str(mem), "full")
    saved = vm.guest_progress()
    await runtime.destroy("live")

    restored = await runtime.load("back", str(snap), MemBackend("File", str(mem)),
                                  resume_vm=True)  # fmt: skip
    await wait_progress_beyond(restored, saved)


async def test_live_diff_after_full_rebases_to_memory_at_the_pause(
    runtime: Runtime, tmp_path: Path
) -> None:
    vm = await _running_writer(runtime, "ldiff")
    await runtime.save("ldiff", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"))
    await wait_progress_beyond(vm, vm.guest_progress())
    marker = 100 * 1024 * 1024  # outside the working set: a device write during the save
    await runtime.write_memory("ldiff", marker, b"device write")
    result = await runtime.save("ldiff", "Diff", str(tmp_path / "d.snap"),
                                str(tmp_path / "d.mem"), live=True, resume=False)  # fmt: skip
    assert result.live and result.parent_pair_id is not None
    verify(read_state_file(str(tmp_path / "d.snap")), str(tmp_path / "d.mem"), "full")
    assert first_memory_difference(rebase_full_and_diff(tmp_path), vm) is None
    # The checkpoint moved: a Diff right away (still paused) is empty.
    empty = await runtime.save("ldiff", "Diff", str(tmp_path / "e.snap"),
                               str(tmp_path / "e.mem"), resume=False)  # fmt: skip
    assert empty.pages_written == 0


@pytest.mark.parametrize(("max_passes", "budget_ms"), [(1, 10.0), (3, 0.0)])
async def test_live_save_forced_into_its_last_pass_is_correct(
    runtime: Runtime, tmp_path: Path, max_passes: int, budget_ms: float
) -> None:
    vm = await _running_writer(runtime, "forced")
    result = await runtime.save("forced", "Full", str(tmp_path / "x.snap"),
                                str(tmp_path / "x.mem"), live=True, max_passes=max_passes,
                                pause_budget_ms=budget_ms, resume=False)  # fmt: skip
    assert result.passes == max_passes
    assert result.pass_limit_reached
    verify(read_state_file(str(tmp_path / "x.snap")), str(tmp_path / "x.mem"), "full")
    assert first_memory_difference(str(tmp_path / "x.mem"), vm) is None


async def test_live_full_of_an_untracked_vm_turns_the_log_off_again(
    runtime: Runtime, tmp_path: Path
) -> None:
    vm = await _running_writer(runtime, "untracked", track=False)
    assert not vm.dirty_logging
    await runtime.save("untracked", "Full", str(tmp_path / "u.snap"), str(tmp_path / "u.mem"),
                       live=True, resume=False)  # fmt: skip
    assert first_memory_difference(str(tmp_path / "u.mem"), vm) is None
    assert not vm.dirty_logging
    with pytest.raises(DiffNotAllowed):
        await runtime.save("untracked", "Diff", str(tmp_path / "d.snap"),
                           str(tmp_path / "d.mem"), live=True)  # fmt: skip
    assert sorted(os.listdir(tmp_path)) == ["u.mem", "u.snap"]


async def test_cancelled_live_save_rolls_back_and_keeps_the_vm_running(
    runtime: Runtime, tmp_path: Path
) -> None:
    # Deterministic: the cancel is requested from pass 1's progress report,
    # which trio runs before the save task can go on to its next pass.
    vm = await _running_writer(runtime, "cancel")
    await runtime.save("cancel", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"))
    before = sorted(os.listdir(tmp_path))
    dirty_before = vm.dirty.page_count()
    phases: list[str] = []
    with trio.CancelScope() as scope:

        def progress(phase: str, done: int, total: int) -> None:
            phases.append(phase)
            scope.cancel()  # an explicit cancel, in the middle of the first pass

        await runtime.save("cancel", "Full", str(tmp_path / "c.snap"), str(tmp_path / "c.mem"),
                           live=True, progress=progress)  # fmt: skip
    assert scope.cancelled_caught
    assert phases
    assert sorted(os.listdir(tmp_path)) == before  # no temps, no new pair
    assert runtime.describe("cancel").state == "Running"
    assert vm.dirty.page_count() >= dirty_before
    await wait_progress_beyond(vm, vm.guest_progress())


async def test_live_save_quiesce_timeout_after_the_passes_writes_nothing(
    tmp_path: Path,
) -> None:
    rt = Runtime(quiesce_timeout_s=0.2)
    try:
        vm = await _running_writer(rt, "lstall", track=False)
        vm.arm_stall(1)
        assert await trio.to_thread.run_sync(vm.wait_stalled, 1, 30.0)
        try:
            with pytest.raises(QuiesceTimeout):
                await rt.save("lstall", "Full", str(tmp_path / "s.snap"),
                              str(tmp_path / "s.mem"), live=True)  # fmt: skip
        finally:
            vm.release_stall(1)
        assert os.listdir(tmp_path) == []
        assert rt.describe("lstall").state == "Running"
        assert not vm.dirty_logging
        await wait_progress_beyond(vm, vm.guest_progress())
    finally:
        await rt.aclose()


async def test_cancel_during_quiesce_rolls_back(tmp_path: Path) -> None:
    rt = Runtime(quiesce_timeout_s=60.0)
    try:
        vm = await _running_writer(rt, "qcancel")
        vm.arm_stall(0)
        assert await trio.to_thread.run_sync(vm.wait_stalled, 0, 30.0)
        try:
            async with trio.open_nursery() as nursery:

                async def save() -> None:
                    await rt.save("qcancel", "Full", str(tmp_path / "q.snap"),
                                  str(tmp_path / "q.mem"))  # fmt: skip

                nursery.start_soon(save)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        finally:
            vm.release_stall(0)
        assert os.listdir(tmp_path) == []
        assert rt.describe("qcancel").state == "Running"
        await wait_progress_beyond(vm, vm.guest_progress())
        await rt.pause("qcancel")  # the abandoned quiesce left nothing behind
    finally:
        await rt.aclose()


async def test_live_save_failing_with_enospc_keeps_running_and_keeps_the_dirty_set(
    runtime: Runtime, tmp_path: Path, small_tmpfs: Path
) -> None:
    vm = await _running_writer(runtime, "lfull")
    await runtime.save("lfull", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"))
    marker = 100 * 1024 * 1024
    # A device write larger than the tmpfs: ENOSPC whatever the guest dirtied meanwhile.
    payload = b"before the failed live save".ljust(OVER_TMPFS, b"x")
    await runtime.write_memory("lfull", marker, payload)
    with pytest.raises(MemoryIo, match=r"No space left on device \(os error 28\)"):
        await runtime.save("lfull", "Diff", str(small_tmpfs / "d.snap"),
                           str(small_tmpfs / "d.mem"), live=True)  # fmt: skip
    assert os.listdir(small_tmpfs) == []
    assert runtime.describe("lfull").state == "Running"
    words = vm.dirty.words()
    assert words is not None
    page = marker // os.sysconf("SC_PAGE_SIZE")
    assert (int(words[0][page // 64]) >> (page % 64)) & 1
    await wait_progress_beyond(vm, vm.guest_progress())
    await runtime.save("lfull", "Diff", str(tmp_path / "d.snap"), str(tmp_path / "d.mem"),
                       live=True, resume=False)  # fmt: skip
    assert first_memory_difference(rebase_full_and_diff(tmp_path), vm) is None


async def test_live_save_of_a_guest_split_around_the_mmio_gap(
    runtime: Runtime, tmp_path: Path
) -> None:
    # 4 GiB of RAM is two regions (below 3.25 GiB and from 4 GiB up); memfd
    # holes keep the files sparse, so this stays cheap.
    vm = await runtime.create_vm("split", 1, 4096, True, GuestSpec("counter"))
    assert len(vm.memory.regions) == 2
    high = vm.memory.regions[1]
    marker_addr = high.guest_addr + 12345 * 4096
    await runtime.write_memory("split", marker_addr, b"above the gap")
    await runtime.start("split")
    await wait_progress_beyond(vm, [0])
    await runtime.save("split", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"))
    await runtime.write_memory("split", marker_addr + 4096, b"dirty above the gap")
    await wait_progress_beyond(vm, vm.guest_progress())
    await runtime.save("split", "Diff", str(tmp_path / "d.snap"), str(tmp_path / "d.mem"),
                       live=True, resume=False)  # fmt: skip
    saved = vm.guest_progress()
    diff = read_state_file(str(tmp_path / "d.snap")).memory
    verify(diff, str(tmp_path / "d.mem"), "full")
    boundary = high.file_offset
    assert all(e.end <= boundary or e.offset >= boundary for e in diff.extents)
    with open(tmp_path / "d.mem", "rb") as mem:
        offset = high.file_offset + (marker_addr + 4096 - high.guest_addr)
        assert os.pread(mem.fileno(), 19, offset) == b"dirty above the gap"
    rebase_full_and_diff(tmp_path)
    await runtime.destroy("split")
    restored = await runtime.load("split2", str(tmp_path / "r.snap"),
                                  MemBackend("File", str(tmp_path / "r.mem")),
                                  resume_vm=True)  # fmt: skip
    assert await runtime.read_memory("split2", marker_addr, 13) == b"above the gap"
    assert await runtime.read_memory("split2", marker_addr + 4096, 19) == b"dirty above the gap"
    await wait_progress_beyond(restored, saved)
