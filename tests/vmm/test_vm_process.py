"""Issue 11: one VM, one process (real KVM, real processes)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from squibd.snapshot.rebase import rebase
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.remote import RemoteVm, find_records
from squibd.vm.runtime import Runtime
from tests.server.helpers import blocking_call, start_daemon
from tests.vm._helpers import PROGRESS_TIMEOUT_S, wait_progress_beyond
from tests.vmm._procfs import proc_status

pytestmark = pytest.mark.kvm

#: Bound on waiting for a daemon or VM state change on a loaded host.
WAIT_S = 60.0


def _wait_exit(pid: int) -> None:
    """Block until process ``pid`` has exited (pidfd: no polling)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [], WAIT_S)
    finally:
        os.close(fd)


def _call(path: str, method: str, params: Any = None) -> Any:
    reply = blocking_call(path, method, params, timeout=WAIT_S)
    assert "error" not in reply, reply
    return reply["result"]


def _describe_until(path: str, vm_id: str, predicate: Any) -> dict[str, Any]:
    """vm.describe until ``predicate`` holds (each call is a real round trip; bounded)."""
    for _ in range(10_000):
        info = _call(path, "vm.describe", {"vm_id": vm_id})
        if predicate(info):
            return info
    raise AssertionError(f"{vm_id}: condition never held; last {info}")


@contextlib.contextmanager
def _reaped(pids: list[int], state: Path | str | None = None) -> Iterator[list[int]]:
    """Kill (by pid) every VM process the test started that is still alive at the end.

    Those listed, and those whose records are left under ``state`` (a failed test).
    """
    try:
        yield pids
    finally:
        if state is not None:
            for record in find_records(str(state)):
                pids.append(int(record["pid"]))
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _create(path: str, vm_id: str) -> int:
    _call(path, "vm.create", {
        "vm_id": vm_id, "vcpu_count": 1, "mem_size_mib": 64,
        "guest": {"program": "counter"}, "track_dirty_pages": True,
    })  # fmt: skip
    info = _call(path, "vm.start", {"vm_id": vm_id})
    assert info["process_id"] not in (None, os.getpid())
    return int(info["process_id"])


def test_sigkill_of_one_vm_process_leaves_the_other_and_the_daemon(tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = ("--vm-isolation", "process", "--state-dir", str(state), "--log-level", "warning")
    proc, path = start_daemon(str(tmp_path), *args)
    with _reaped([], state) as pids:
        try:
            pids += [_create(path, "a"), _create(path, "b")]
            before = _describe_until(path, "b", lambda i: i["guest_progress"][0] > 0)
            os.kill(pids[0], signal.SIGKILL)
            _wait_exit(pids[0])
            dead = _describe_until(path, "a", lambda i: i["error"] is not None)
            assert "SIGKILL" in dead["error"], dead
            assert _call(path, "daemon.status")["vm_count"] == 2
            progress = before["guest_progress"][0]
            _describe_until(path, "b", lambda i: i["guest_progress"][0] > progress)
            assert _call(path, "vm.describe", {"vm_id": "b"})["error"] is None
            _call(path, "vm.destroy", {"vm_id": "a"})
            _call(path, "vm.destroy", {"vm_id": "b"})
            _wait_exit(pids[1])
            assert not list((state / "vms").iterdir())
        finally:
            _stop(proc)


def test_daemon_sigkill_and_restart_reattaches_running_vms(tmp_path: Path) -> None:
    state = tmp_path / "state"
    args = ("--vm-isolation", "process", "--state-dir", str(state), "--log-level", "warning")
    first, path = start_daemon(str(tmp_path), *args)
    with _reaped([], state) as pids:
        try:
            pids += [_create(path, "a"), _create(path, "b")]
            seen = {
                vm: _describe_until(path, vm, lambda i: i["guest_progress"][0] > 0)
                for vm in ("a", "b")
            }
            pre = tmp_path / "pre"
            pre.mkdir()
            _call(path, "snapshot.create", {
                "vm_id": "a", "snapshot_path": str(pre / "f.snap"),
                "mem_file_path": str(pre / "f.mem"),
            })  # fmt: skip
            _call(path, "snapshot.load", {
                "vm_id": "c", "snapshot_path": str(pre / "f.snap"), "resume_vm": True,
                "mem_backend": {"backend_type": "File", "backend_path": str(pre / "f.mem")},
            })  # fmt: skip
            c_seen = _describe_until(path, "c", lambda i: i["guest_progress"][0] > 0)
            first.kill()
            first.wait()
            assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
            (tmp_path / "again").mkdir()
            second, path = start_daemon(str(tmp_path / "again"), *args)
        finally:
            _stop(first)
        try:
            assert sorted(vm["vm_id"] for vm in _call(path, "vm.list")["vms"]) == ["a", "b", "c"]
            # A File-loaded VM re-attached: its save copies what the guest wrote.
            c_info = _call(path, "vm.describe", {"vm_id": "c"})
            assert c_info["guest_progress"][0] > c_seen["guest_progress"][0]
            _call(path, "vm.pause", {"vm_id": "c"})
            c_paused = _call(path, "vm.describe", {"vm_id": "c"})["guest_progress"]
            _call(path, "snapshot.create", {
                "vm_id": "c", "snapshot_path": str(pre / "c.snap"),
                "mem_file_path": str(pre / "c.mem"),
            })  # fmt: skip
            _call(path, "snapshot.load", {
                "vm_id": "c2", "snapshot_path": str(pre / "c.snap"),
                "mem_backend": {"backend_type": "File", "backend_path": str(pre / "c.mem")},
            })  # fmt: skip
            assert _call(path, "vm.describe", {"vm_id": "c2"})["guest_progress"] == c_paused
            _call(path, "vm.destroy", {"vm_id": "c"})
            _call(path, "vm.destroy", {"vm_id": "c2"})
            for vm_id, pid in zip(("a", "b"), list(pids), strict=True):
                info = _call(path, "vm.describe", {"vm_id": vm_id})
                assert info["process_id"] == pid and info["state"] == "Running"
                assert info["guest_progress"][0] > seen[vm_id]["guest_progress"][0]
                d = tmp_path / vm_id
                d.mkdir()
                for kind, name in (("Full", "f"), ("Diff", "d")):
                    _call(path, "snapshot.create", {
                        "vm_id": vm_id, "snapshot_type": kind,
                        "snapshot_path": str(d / f"{name}.snap"),
                        "mem_file_path": str(d / f"{name}.mem"),
                    })  # fmt: skip
                rebase(str(d / "f.snap"), [str(d / "d.snap")], str(d / "r.snap"),
                       str(d / "r.mem"), base_mem=str(d / "f.mem"),
                       diff_mems=[str(d / "d.mem")])  # fmt: skip
                _call(path, "vm.pause", {"vm_id": vm_id})
                paused = _call(path, "vm.describe", {"vm_id": vm_id})["guest_progress"]
                _call(path, "snapshot.create", {
                    "vm_id": vm_id, "snapshot_type": "Diff",
                    "snapshot_path": str(d / "e.snap"), "mem_file_path": str(d / "e.mem"),
                })  # fmt: skip
                rebase(str(d / "r.snap"), [str(d / "e.snap")], str(d / "s.snap"),
                       str(d / "s.mem"), base_mem=str(d / "r.mem"),
                       diff_mems=[str(d / "e.mem")])  # fmt: skip
                loaded = _call(path, "snapshot.load", {
                    "vm_id": f"{vm_id}-restored", "snapshot_path": str(d / "s.snap"),
                    "mem_backend": {"backend_type": "File", "backend_path": str(d / "s.mem")},
                })  # fmt: skip
                assert loaded
                loaded = _call(path, "vm.describe", {"vm_id": f"{vm_id}-restored"})
                pids.append(int(loaded["process_id"]))
                assert loaded["guest_progress"] == paused
                _call(path, "vm.resume", {"vm_id": f"{vm_id}-restored"})
                floor = paused[0]
                _describe_until(
                    path, f"{vm_id}-restored", lambda i, f=floor: i["guest_progress"][0] > f
                )
            for vm_id in ("a", "b", "a-restored", "b-restored"):
                _call(path, "vm.destroy", {"vm_id": vm_id})
        finally:
            _stop(second)


async def test_vm_process_is_confined_and_a_forbidden_syscall_kills_only_it() -> None:
    rt = Runtime(
        quiesce_timeout_s=30.0, vm_isolation="process",
        confine={"user": "nobody", "seccomp": True, "test_hooks": True},
    )  # fmt: skip
    try:
        victim = await rt.create_vm("victim", 1, 64, False, GuestSpec("counter"))
        other = await rt.create_vm("other", 1, 64, False, GuestSpec("counter"))
        assert isinstance(victim, RemoteVm)
        status = proc_status(victim.process_id)
        assert status["Seccomp"].strip() == "2"
        nobody = str(65534)
        assert status["Uid"].split() == [nobody] * 4
        await rt.start("victim")
        await rt.start("other")
        await wait_progress_beyond(other, [0])
        with pytest.raises(Exception, match="ProcessGone"):
            await trio.to_thread.run_sync(lambda: victim._conn.call("debug_syscall"))
        with trio.fail_after(PROGRESS_TIMEOUT_S):
            await victim.wait_failed()
        assert "SIGSYS" in (rt.describe("victim").error or "")
        await wait_progress_beyond(other, other.guest_progress())
        assert rt.describe("other").error is None
    finally:
        await rt.aclose()


async def test_quiesce_timeout_across_the_boundary_resumes_the_vm() -> None:
    from squibd.snapshot.errors import QuiesceTimeout

    rt = Runtime(quiesce_timeout_s=0.5, vm_isolation="process")
    try:
        vm = await rt.create_vm("q", 2, 64, False, GuestSpec("counter"))
        await rt.start("q")
        await wait_progress_beyond(vm, [0, 0])
        await trio.to_thread.run_sync(lambda: vm.arm_stall(1))
        assert await trio.to_thread.run_sync(lambda: vm.wait_stalled(1, WAIT_S))
        with pytest.raises(QuiesceTimeout):
            await rt.pause("q")
        assert rt.describe("q").state == "Running"
        before = vm.guest_progress()
        await wait_progress_beyond(vm, [before[0], -1])
        await trio.to_thread.run_sync(lambda: vm.release_stall(1))
        await wait_progress_beyond(vm, vm.guest_progress())
        await rt.pause("q")
        assert rt.describe("q").state == "Paused"
    finally:
        await rt.aclose()


async def test_file_load_in_a_vm_process_saves_what_the_guest_wrote(tmp_path: Path) -> None:
    """A File restore maps the file privately in the VM process; the daemon's shadow follows."""
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        vm = await rt.create_vm("src", 1, 64, False, GuestSpec("memwriter", {"working_set_mib": 8}))
        await rt.start("src")
        await wait_progress_beyond(vm, [0])
        await rt.save("src", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"))
        await rt.destroy("src")
        backend = MemBackend("File", str(tmp_path / "f.mem"))
        loaded = await rt.load("dst", str(tmp_path / "f.snap"), backend, resume_vm=True)
        assert isinstance(loaded, RemoteVm) and loaded.shadowed
        await wait_progress_beyond(loaded, loaded.guest_progress())
        await rt.save("dst", "Full", str(tmp_path / "g.snap"), str(tmp_path / "g.mem"),
                      resume=False)  # fmt: skip
        with open(tmp_path / "g.mem", "rb") as f:
            saved = f.read()
        region = loaded.memory.regions[0]
        live = await trio.to_thread.run_sync(lambda: loaded.read_memory(0, region.size))
        assert saved[: region.size] == live
        assert saved != (tmp_path / "f.mem").read_bytes()
    finally:
        await rt.aclose()


def test_an_unresponsive_vm_process_blocks_neither_the_daemon_nor_other_vms(
    tmp_path: Path,
) -> None:
    """A VM process that answers nothing (stopped here; a stalled page server alike)."""
    state = tmp_path / "state"
    args = ("--vm-isolation", "process", "--state-dir", str(state), "--log-level", "warning")
    proc, path = start_daemon(str(tmp_path), *args)
    with _reaped([], state) as pids:
        try:
            pids += [_create(path, "stuck"), _create(path, "fine")]
            before = _describe_until(path, "fine", lambda i: i["guest_progress"][0] > 0)
            os.kill(pids[0], signal.SIGSTOP)
            try:
                assert _call(path, "daemon.status")["vm_count"] == 2
                progress = before["guest_progress"][0]
                _describe_until(path, "fine", lambda i: i["guest_progress"][0] > progress)
                assert _call(path, "vm.describe", {"vm_id": "stuck"})["error"] is None
                reply = blocking_call(path, "vm.pause", {"vm_id": "stuck"}, timeout=WAIT_S)
                assert "QuiesceTimeout" in str(reply.get("error")), reply
                assert _call(path, "vm.pause", {"vm_id": "fine"})["state"] == "Paused"
            finally:
                os.kill(pids[0], signal.SIGCONT)
            for vm_id in ("stuck", "fine"):
                _call(path, "vm.destroy", {"vm_id": vm_id})
        finally:
            _stop(proc)


@pytest.mark.parametrize("stop_vms_on_exit", [False, True])
async def test_stop_vms_on_exit_decides_whether_vm_processes_outlive_the_daemon(
    tmp_path: Path, stop_vms_on_exit: bool
) -> None:
    state = str(tmp_path / "state")
    first = Runtime(quiesce_timeout_s=30.0, vm_isolation="process", state_dir=state,
                    stop_vms_on_exit=stop_vms_on_exit)  # fmt: skip
    with _reaped([], state) as pids:
        try:
            vm = await first.create_vm("kept", 1, 64, True, GuestSpec("counter"))
            assert isinstance(vm, RemoteVm)
            pids.append(vm.process_id)
            await first.start("kept")
            await wait_progress_beyond(vm, [0])
        finally:
            await first.aclose()
        if stop_vms_on_exit:
            await trio.to_thread.run_sync(_wait_exit, pids[0])
            gone = not os.path.exists(f"/proc/{pids[0]}/status")
            assert gone or "Z" in proc_status(pids[0])["State"]
            return
        second = Runtime(quiesce_timeout_s=30.0, vm_isolation="process", state_dir=state)
        try:
            assert await second.reattach() == ["kept"]
            again = second.get("kept")
            assert isinstance(again, RemoteVm) and again.process_id == pids[0]
            assert second.describe("kept").state == "Running"
            await wait_progress_beyond(again, again.guest_progress())
            await second.pause("kept")
            await second.destroy("kept")
            await trio.to_thread.run_sync(_wait_exit, pids[0])
        finally:
            await second.aclose()


def test_uffd_load_in_a_vm_process_saves_and_reports_page_server_death(tmp_path: Path) -> None:
    from squibd.vm.errors import VmFailed
    from tests.hostile._peers import save_counter_pair
    from tests.vm.test_uffd_load import _start_page_server

    snap, _mem = save_counter_pair(tmp_path)
    socket_path = tmp_path / "ps.sock"
    server = _start_page_server(Path(snap), socket_path)

    async def run() -> None:
        rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
        try:
            vm = await rt.load("lazy", snap, MemBackend("Uffd", str(socket_path)),
                               resume_vm=True)  # fmt: skip
            assert isinstance(vm, RemoteVm) and vm.lazy
            progress = await trio.to_thread.run_sync(vm.guest_progress)
            await wait_progress_beyond(vm, progress)
            out = tmp_path / "out"
            out.mkdir()
            await rt.save("lazy", "Full", str(out / "f.snap"), str(out / "f.mem"), resume=False)
            size = vm.memory.regions[0].size
            live = await trio.to_thread.run_sync(lambda: vm.read_memory(0, size))
            with open(out / "f.mem", "rb") as f:
                assert f.read(len(live)) == live
            await rt.resume("lazy")
            server.kill()
            with trio.fail_after(PROGRESS_TIMEOUT_S):
                await vm.wait_failed()
            assert "page server" in (rt.describe("lazy").error or "")
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


def test_a_vm_process_on_a_stalled_page_server_blocks_nothing_else(tmp_path: Path) -> None:
    from tests.hostile._peers import StallingPageServer, save_counter_pair

    snap, _mem = save_counter_pair(tmp_path)
    page_server = StallingPageServer(str(tmp_path / "ps.sock"))
    state = tmp_path / "state"
    args = ("--vm-isolation", "process", "--state-dir", str(state), "--log-level", "warning")
    (tmp_path / "d").mkdir()
    proc, path = start_daemon(str(tmp_path / "d"), *args)
    with _reaped([], state) as pids:
        try:
            pids.append(_create(path, "other"))
            _call(path, "snapshot.load", {
                "vm_id": "lazy", "snapshot_path": snap, "resume_vm": True,
                "mem_backend": {"backend_type": "Uffd", "backend_path": page_server.path},
            })  # fmt: skip
            lazy = _call(path, "vm.describe", {"vm_id": "lazy"})
            pids.append(int(lazy["process_id"]))
            assert lazy["guest_progress"] is None and lazy["guest_progress_stale"] is True
            assert _call(path, "daemon.status")["vm_count"] == 2
            before = _call(path, "vm.describe", {"vm_id": "other"})["guest_progress"][0]
            _describe_until(path, "other", lambda i: i["guest_progress"][0] > before)
            out = tmp_path / "out"
            out.mkdir()
            reply = blocking_call(path, "snapshot.create", {
                "vm_id": "lazy", "snapshot_type": "Full",
                "snapshot_path": str(out / "o.snap"), "mem_file_path": str(out / "o.mem"),
            }, timeout=WAIT_S)  # fmt: skip
            assert reply["error"]["data"]["kind"] == "GuestMemoryUnavailable", reply
            assert list(out.iterdir()) == []
            _call(path, "vm.destroy", {"vm_id": "lazy"})
            _call(path, "vm.destroy", {"vm_id": "other"})
        finally:
            _stop(proc)
            page_server.close()
