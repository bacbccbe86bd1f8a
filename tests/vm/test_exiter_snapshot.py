"""The exit-heavy ``exiter`` guest across a Full save and a File restore (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from squibd.kvm.errors import GuestProgramError
from squibd.vm.errors import InvalidVmConfig
from squibd.vm.machine import Vm
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime

from ._helpers import wait_progress_beyond

pytestmark = pytest.mark.kvm

#: Small requests: the guest exits often and the test stays fast.
WORK_UNITS = 4


async def save_and_restore_exiter(rt: Runtime, tmp_path: Path) -> Vm:
    """Run ``exiter``, save it Full, load the pair and check it goes on from its counter.

    Returns the loaded VM (paused). Shared with ``tests/vmm`` (the same steps
    against VM processes).
    """
    vm = await rt.create_vm("ex", 1, 64, False, GuestSpec("exiter", {"work_units": WORK_UNITS}))
    await rt.start("ex")
    first = await wait_progress_beyond(vm, [0])  # its heartbeats reach the runtime
    await wait_progress_beyond(vm, first)
    snap, mem = str(tmp_path / "ex.snap"), str(tmp_path / "ex.mem")
    await rt.save("ex", "Full", snap, mem, resume=False)  # quiesced between exits
    saved = vm.guest_progress()
    assert saved[0] > first[0]
    await rt.destroy("ex")

    loaded = await rt.load("ex2", snap, MemBackend("File", mem))
    assert loaded.guest_progress() == saved
    assert rt.describe("ex2").state == "Paused"
    await rt.resume("ex2")
    after = await wait_progress_beyond(loaded, saved)
    await rt.pause("ex2")
    assert after[0] > saved[0]
    assert loaded.error is None
    assert rt.describe("ex2").state == "Paused"
    return loaded


async def test_exiter_carries_on_from_its_counter_after_full_save_and_load(
    runtime: Runtime, tmp_path: Path
) -> None:
    await save_and_restore_exiter(runtime, tmp_path)


async def test_exiter_with_too_big_a_request_is_refused_and_leaves_no_vm(
    runtime: Runtime,
) -> None:
    with pytest.raises((InvalidVmConfig, GuestProgramError), match="work_units"):
        await runtime.create_vm("big", 1, 64, False, GuestSpec("exiter", {"work_units": 256}))
    assert "big" not in runtime.list()
