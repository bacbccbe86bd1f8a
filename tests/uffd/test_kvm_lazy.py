"""Lazy restore of real KVM guests through userfaultfd and a page-server process."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest
import trio

from squibd.uffd import UffdError
from squibd.vm.machine import Vm
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime

from ._procs import page_server
from .test_handshake import PlainPageServer

pytestmark = pytest.mark.kvm

MEM_MIB: Final = 64
#: Generous bound for a guest to show progress on a noisy, shared host.
PROGRESS_TIMEOUT_S: Final = 60.0


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    rt = Runtime(quiesce_timeout_s=1.0)
    try:
        yield rt
    finally:
        await rt.aclose()


async def _progress_beyond(vm: Vm, floor: list[int]) -> list[int]:
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        while True:
            # guest_progress faults pages in from this (trio) thread: run it off-thread.
            progress = await trio.to_thread.run_sync(vm.guest_progress)
            if all(now > before for now, before in zip(progress, floor, strict=True)):
                return progress
            await vm.wait_heartbeats(1)


async def _saved_counter_vm(runtime: Runtime, tmp_path: Path, *, dirty: bool = False
                            ) -> tuple[Path, list[int]]:
    vm = await runtime.create_vm("src", 2, MEM_MIB, dirty, GuestSpec("counter"))
    await runtime.start("src")
    await _progress_beyond(vm, [0, 0])
    snap = tmp_path / "full.snap"
    await runtime.save("src", "Full", str(snap), str(tmp_path / "full.mem"), resume=False)
    saved = vm.guest_progress()
    return snap, saved


async def test_full_snapshot_continues_through_uffd(runtime: Runtime, tmp_path: Path) -> None:
    snap, saved = await _saved_counter_vm(runtime, tmp_path)
    await runtime.destroy("src")
    sock = tmp_path / "ps.sock"
    with page_server(snap, sock) as proc:
        vm = await runtime.load("dst", str(snap), MemBackend("Uffd", str(sock)), resume_vm=False)
        assert await trio.to_thread.run_sync(vm.guest_progress) == saved
        await runtime.resume("dst")
        now = await _progress_beyond(vm, saved)
        assert all(n > s > 0 for n, s in zip(now, saved, strict=True))
        assert runtime.describe("dst").error is None
        await runtime.destroy("dst")
        assert proc.wait(PROGRESS_TIMEOUT_S) == 0


async def test_full_plus_diff_chain_is_served_without_rebase(runtime: Runtime, tmp_path: Path
                                                             ) -> None:
    snap, _ = await _saved_counter_vm(runtime, tmp_path, dirty=True)
    vm = runtime.get("src")
    await runtime.resume("src")
    first = vm.guest_progress()
    await _progress_beyond(vm, first)
    diff = tmp_path / "diff.snap"
    await runtime.save("src", "Diff", str(diff), str(tmp_path / "diff.mem"), resume=False)
    saved = vm.guest_progress()
    await runtime.destroy("src")
    sock = tmp_path / "ps.sock"
    with page_server(snap, sock, "--diff-snapshot", str(diff)):
        vm2 = await runtime.load("dst", str(diff), MemBackend("Uffd", str(sock)), resume_vm=False)
        # The Diff's counters (newer than the Full's) are what the guest sees.
        assert await trio.to_thread.run_sync(vm2.guest_progress) == saved
        assert all(s > f for s, f in zip(saved, first, strict=True))
        await runtime.resume("dst")
        now = await _progress_beyond(vm2, saved)
        assert all(n > s for n, s in zip(now, saved, strict=True))
        await runtime.destroy("dst")


async def test_plain_socket_page_server_can_serve_the_vm(runtime: Runtime, tmp_path: Path
                                                         ) -> None:
    """The handshake-shape server of test_handshake (no squibd code, a thread of this
    process) serves the restored VM from the memory file; the guest continues."""
    snap, saved = await _saved_counter_vm(runtime, tmp_path)
    await runtime.destroy("src")
    path = tmp_path / "plain.sock"
    server = PlainPageServer(path, memory_file=tmp_path / "full.mem")
    vm = await runtime.load("dst", str(snap), MemBackend("Uffd", str(path)), resume_vm=True)
    assert len(server.regions) == len(vm.memory.regions)
    # Heartbeats come from the vCPUs, which fault with the GIL released; once they beat,
    # their progress pages are served and reading them here cannot block on the server.
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        await vm.wait_heartbeats(4)
    now = await _progress_beyond(vm, saved)
    assert all(n > s for n, s in zip(now, saved, strict=True))
    await runtime.destroy("dst")
    await trio.to_thread.run_sync(lambda: server.thread.join(PROGRESS_TIMEOUT_S))
    assert server.served > 0


async def test_killed_page_server_puts_the_vm_in_error_and_others_keep_running(
    runtime: Runtime, tmp_path: Path
) -> None:
    snap, saved = await _saved_counter_vm(runtime, tmp_path)
    await runtime.destroy("src")
    other = await runtime.create_vm("other", 1, MEM_MIB, False, GuestSpec("counter"))
    await runtime.start("other")
    sock = tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc:
        vm = await runtime.load("dst", str(snap), MemBackend("Uffd", str(sock)), resume_vm=True)
        await _progress_beyond(vm, saved)
        os.kill(proc.pid, signal.SIGKILL)
        with trio.fail_after(PROGRESS_TIMEOUT_S):
            await vm.wait_failed()
        error = runtime.describe("dst").error
        assert error is not None and "page server" in error and str(sock) in error
        assert runtime.describe("dst").state == "Paused"
        before = other.guest_progress()
        await _progress_beyond(other, before)  # the other VM and the runtime keep going
        await runtime.destroy("dst")


async def test_corrupt_chunk_on_the_first_pages_fails_the_load_naming_the_offset(
    runtime: Runtime, tmp_path: Path
) -> None:
    snap, _ = await _saved_counter_vm(runtime, tmp_path)
    await runtime.destroy("src")
    # Corrupt the counter guest's progress page (vCPU 0's counter at guest 0x20000): the
    # vCPUs touch it at once, so the page server finds it while prefetching.
    corrupt = 0x20000
    with open(tmp_path / "full.mem", "r+b") as mem:
        mem.seek(corrupt + 64)
        byte = mem.read(1)
        mem.seek(corrupt + 64)
        mem.write(bytes([byte[0] ^ 0xFF]))
    sock = tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc:
        with pytest.raises(UffdError, match="0x20000") as raised:
            await runtime.load("dst", str(snap), MemBackend("Uffd", str(sock)), resume_vm=True)
        assert "corrupt" in str(raised.value)
        assert runtime.list() == []  # no VM was left behind, none ran
        assert proc.wait(PROGRESS_TIMEOUT_S) == 1


async def test_page_server_killed_before_the_vcpus_run_never_lets_them_run_on_holes(
    runtime: Runtime, tmp_path: Path
) -> None:
    snap, saved = await _saved_counter_vm(runtime, tmp_path)
    await runtime.destroy("src")
    sock = tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc:
        vm = await runtime.load("dst", str(snap), MemBackend("Uffd", str(sock)), resume_vm=False)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(PROGRESS_TIMEOUT_S)
        await runtime.resume("dst")
        with trio.fail_after(PROGRESS_TIMEOUT_S):
            await vm.wait_failed()
        assert "page server" in (runtime.describe("dst").error or "")
        await runtime.destroy("dst")  # stops vCPUs that may be blocked in a fault
    assert runtime.list() == []
    assert saved[0] > 0
