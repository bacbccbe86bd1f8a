"""The first Diff after a daemon restart holds what changed, not every page (issue 11).

The VM process keeps a mirror of the daemon's dirty set (every KVM harvest,
every page squibd wrote itself, every clear after a commit): a re-attaching
daemon starts from it, so a Diff needs only the pages written since the last
committed snapshot, including those a previous daemon harvested or wrote.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import trio

from squibd.snapshot.rebase import rebase
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.remote import RemoteVm, find_records
from squibd.vm.runtime import Runtime
from tests.vm._helpers import wait_progress_beyond

pytestmark = pytest.mark.kvm

MIB = 1024 * 1024
PAGE = 4096
#: The guest's RAM: 64 MiB is 16384 pages, far more than a counter guest dirties.
MEM_MIB = 64
#: A page squibd writes itself (KVM does not log it) before the daemon goes.
WRITTEN_ADDR = 40 * MIB
WRITTEN = b"written by the first daemon".ljust(PAGE, b".")
BEFORE_FULL_ADDR = 8 * MIB
BEFORE_FULL_BYTES = 8 * MIB


def _runtime(state: str) -> Runtime:
    return Runtime(quiesce_timeout_s=30.0, vm_isolation="process", state_dir=state)


async def test_the_first_diff_after_a_reattach_holds_only_what_changed(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    snap = {name: str(tmp_path / f"{name}.snap") for name in ("f", "d", "r")}
    mem = {name: str(tmp_path / f"{name}.mem") for name in ("f", "d", "r")}
    first = _runtime(state)
    pid = 0
    try:
        vm = await first.create_vm("v", 1, MEM_MIB, True, GuestSpec("counter"))
        assert isinstance(vm, RemoteVm)
        pid = vm.process_id
        await first.start("v")
        await wait_progress_beyond(vm, [0])
        # 2048 pages squibd writes before the Full: once it is committed they are
        # clean (the clear is mirrored too), so the Diff must not hold them again.
        for offset in range(0, BEFORE_FULL_BYTES, MIB):
            await first.write_memory("v", BEFORE_FULL_ADDR + offset, b"\xa5" * MIB)
        await first.save("v", "Full", snap["f"], mem["f"])
        await first.write_memory("v", WRITTEN_ADDR, WRITTEN)
        # The first daemon harvests the dirty log once more (as a save that never
        # commits would), then goes away.
        await trio.to_thread.run_sync(vm.harvest_kvm)
        await first.aclose()  # stop_vms_on_exit is off: the VM process runs on

        second = _runtime(state)
        try:
            assert await second.reattach() == ["v"]
            again = second.get("v")
            await wait_progress_beyond(again, again.guest_progress())
            await second.pause("v")
            paused = again.guest_progress()
            result = await second.save("v", "Diff", snap["d"], mem["d"])
            total = MEM_MIB * MIB // PAGE
            assert 1 <= result.pages_written < total // 16, result
            rebase(snap["f"], [snap["d"]], snap["r"], mem["r"], base_mem=mem["f"],
                   diff_mems=[mem["d"]])  # fmt: skip
            await second.load("w", snap["r"], MemBackend("File", mem["r"]))
            restored = second.get("w")
            assert restored.guest_progress() == paused
            assert await second.read_memory("w", WRITTEN_ADDR, PAGE) == WRITTEN
        finally:
            await second.aclose()
    finally:
        for record in find_records(state):
            with contextlib.suppress(ProcessLookupError, KeyError):
                os.kill(int(record["pid"]), signal.SIGKILL)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
