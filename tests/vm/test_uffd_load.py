"""Loading with the Uffd backend: a page server process serves the guest's memory."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from squibd.uffd.errors import UffdError
from squibd.vm.errors import VmFailed
from squibd.vm.machine import Vm
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime

from ._helpers import PROGRESS_TIMEOUT_S, wait_progress_beyond
from .conftest import PATIENT_QUIESCE_TIMEOUT_S

pytestmark = pytest.mark.kvm

#: The page server prints this line once its socket is bound.
LISTENING = "listening "


@pytest.fixture
def saved_pair(tmp_path: Path) -> Iterator[tuple[Path, Path, list[int]]]:
    async def save() -> list[int]:
        rt = Runtime(quiesce_timeout_s=PATIENT_QUIESCE_TIMEOUT_S)
        try:
            vm = await rt.create_vm("src", 1, 64, False, GuestSpec("counter"))
            await rt.start("src")
            await wait_progress_beyond(vm, [0])
            await rt.save("src", "Full", str(tmp_path / "u.snap"), str(tmp_path / "u.mem"),
                          resume=False)  # fmt: skip
            return vm.guest_progress()
        finally:
            await rt.aclose()

    yield tmp_path / "u.snap", tmp_path / "u.mem", trio.run(save)


def _start_page_server(snap: Path, socket_path: Path) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "squibd.cli.daemon", "--page-server", "--snapshot", str(snap),
         "--socket", str(socket_path)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith(LISTENING), line
    return server


def test_uffd_load_runs_and_page_server_death_is_an_error_state(
    saved_pair: tuple[Path, Path, list[int]], tmp_path: Path, vm_isolation: str
) -> None:
    snap, _, saved = saved_pair
    socket_path = tmp_path / "ps.sock"
    server = _start_page_server(snap, socket_path)

    async def run() -> None:
        rt = Runtime(vm_isolation=vm_isolation)  # each runtime in turn (conftest)
        try:
            vm = await rt.load("lazy", str(snap), MemBackend("Uffd", str(socket_path)),
                               resume_vm=True)  # fmt: skip
            await wait_progress_beyond(vm, saved)
            server.kill()
            with trio.fail_after(PROGRESS_TIMEOUT_S):
                await vm.wait_failed()
            described = rt.describe("lazy")
            assert described.error is not None and "page server" in described.error
            with pytest.raises(VmFailed):
                await rt.resume("lazy")
            await rt.destroy("lazy")
        finally:
            await rt.aclose()

    try:
        trio.run(run)
    finally:
        server.kill()
        server.wait()


def test_uffd_load_refuses_a_page_server_serving_another_pair(
    saved_pair: tuple[Path, Path, list[int]], tmp_path: Path, vm_isolation: str
) -> None:
    snap, _, _ = saved_pair
    other_snap, other_mem = tmp_path / "other.snap", tmp_path / "other.mem"

    async def save_other() -> None:
        # Same layout (one vCPU, 64 MiB), another pair id.
        rt = Runtime(quiesce_timeout_s=PATIENT_QUIESCE_TIMEOUT_S)
        try:
            vm = await rt.create_vm("other", 1, 64, False, GuestSpec("counter"))
            await rt.start("other")
            await wait_progress_beyond(vm, [0])
            await rt.save("other", "Full", str(other_snap), str(other_mem))
        finally:
            await rt.aclose()

    trio.run(save_other)
    socket_path = tmp_path / "other.sock"
    server = _start_page_server(other_snap, socket_path)

    async def load_mismatched() -> None:
        rt = Runtime(vm_isolation=vm_isolation)  # each runtime in turn (conftest)
        try:
            with pytest.raises(UffdError, match="belongs to pair"):
                await rt.load("lazy", str(snap), MemBackend("Uffd", str(socket_path)))
            assert rt.list() == []  # nothing half-loaded stays registered
        finally:
            await rt.aclose()

    try:
        trio.run(load_mismatched)
    finally:
        server.kill()
        server.wait()


async def _served_progress_beyond(vm: Vm, floor: list[int]) -> list[int]:
    """Like wait_progress_beyond, reading guest memory off the trio thread (a page nobody
    serves blocks that thread: the wait then fails instead of hanging)."""
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        while True:
            progress = await trio.to_thread.run_sync(vm.guest_progress, abandon_on_cancel=True)
            if all(now > before for now, before in zip(progress, floor, strict=True)):
                return progress
            await vm.wait_heartbeats(1)


def test_one_page_server_serves_two_lazy_loads_at_once(
    saved_pair: tuple[Path, Path, list[int]], tmp_path: Path, vm_isolation: str
) -> None:
    """Issue 10: a second lazy load from one page server used to queue behind the first
    forever (its vCPUs blocked on faults nobody served)."""
    snap, _, saved = saved_pair
    socket_path = tmp_path / "ps.sock"
    server = _start_page_server(snap, socket_path)

    async def run() -> None:
        rt = Runtime(vm_isolation=vm_isolation)  # each runtime in turn (conftest)
        try:
            backend = MemBackend("Uffd", str(socket_path))
            first = await rt.load("first", str(snap), backend, resume_vm=True)
            second = await rt.load("second", str(snap), backend, resume_vm=True)
            await _served_progress_beyond(second, saved)
            await _served_progress_beyond(first, saved)
            await rt.destroy("second")
            now = await _served_progress_beyond(first, saved)
            await _served_progress_beyond(first, now)  # still served after the other left
            assert rt.describe("first").error is None
            await rt.destroy("first")
        finally:
            await rt.aclose()

    try:
        trio.run(run)
        assert server.wait(PROGRESS_TIMEOUT_S) == 0  # both VMs gone: the server exits
    finally:
        server.kill()
        server.wait()
