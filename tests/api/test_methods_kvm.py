"""Every VM and snapshot method end to end: real daemon, real socket, real KVM guests."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio

from squibd.client import AsyncClient, SquibdError
from squibd.server import Server
from tests.server.helpers import running_server

pytestmark = pytest.mark.kvm

#: Host-written filler starts here, far above the guest's code, page tables and stacks.
FILL_BASE = 64 * 1024 * 1024
#: Enough touched memory that a save reports progress many times before it commits.
FILL_SIZE = 256 * 1024 * 1024
_CHUNK = 16 * 1024 * 1024
_MIB = 1024 * 1024


def _fill(server: Server, vm_id: str) -> None:
    block = os.urandom(_CHUNK)
    vm = server.api.runtime.get(vm_id)  # in a worker thread: the blocking write is fine
    for offset in range(0, FILL_SIZE, _CHUNK):
        vm.write_memory(FILL_BASE + offset, block)


async def _create(client: AsyncClient, vm_id: str, *, dirty: bool = True, mib: int = 64,
                  vcpus: int = 2) -> dict[str, Any]:  # fmt: skip
    result: dict[str, Any] = await client.call("vm.create", {
        "vm_id": vm_id, "vcpu_count": vcpus, "mem_size_mib": mib,
        "track_dirty_pages": dirty, "guest": {"program": "counter"},
    })  # fmt: skip
    return result


async def _progress_beyond(client: AsyncClient, vm_id: str, floor: list[int]) -> list[int]:
    """Ask vm.describe until every vCPU's counter is past ``floor`` (guest is running)."""
    with trio.fail_after(60):  # a hang guard, not a timing assertion
        while True:
            progress: list[int] = (await client.call("vm.describe", {"vm_id": vm_id}))[
                "guest_progress"
            ]
            if all(p > f for p, f in zip(progress, floor, strict=True)):
                return progress


async def _error(coro: Any) -> Any:
    with pytest.raises(SquibdError) as info:
        await coro
    return info.value


@pytest.fixture
async def daemon(sockdir: str) -> AsyncIterator[tuple[Server, str]]:
    path = f"{sockdir}/s.sock"
    async with running_server(path, debug_api=True) as server:
        yield server, path


async def test_vm_lifecycle_methods(daemon: tuple[Server, str]) -> None:
    _, path = daemon
    async with AsyncClient(path) as c:
        info = await _create(c, "life")
        assert info["state"] == "NotStarted"
        assert info["vcpu_count"] == 2 and info["mem_size_mib"] == 64
        assert info["track_dirty_pages"] is True
        assert info["guest_progress"] == [0, 0]
        assert (await c.call("vm.list"))["vms"] == [info]
        dup = await _error(_create(c, "life"))
        assert dup.code == -32003 and dup.kind == "DuplicateVm"
        assert (await c.call("vm.start", {"vm_id": "life"}))["state"] == "Running"
        again = await _error(c.call("vm.start", {"vm_id": "life"}))
        assert again.code == -32003 and "life" in again.message
        await _progress_beyond(c, "life", [0, 0])
        paused = await c.call("vm.pause", {"vm_id": "life"})
        assert paused["state"] == "Paused"
        still = await c.call("vm.describe", {"vm_id": "life"})
        assert still["guest_progress"] == paused["guest_progress"]  # a paused guest stands still
        assert (await c.call("vm.resume", {"vm_id": "life"}))["state"] == "Running"
        await _progress_beyond(c, "life", paused["guest_progress"])
        assert await c.call("vm.destroy", {"vm_id": "life"}) == {
            "vm_id": "life", "destroyed": True
        }
        gone = await _error(c.call("vm.describe", {"vm_id": "life"}))
        assert gone.code == -32002 and gone.kind == "UnknownVm"
        status = await c.call("daemon.status")
        assert status["vm_count"] == 0 and status["kvm_available"] is True


async def test_full_diff_destroy_rebase_load_continues(daemon: tuple[Server, str],
                                                       sockdir: str) -> None:  # fmt: skip
    _, path = daemon
    d = sockdir
    async with AsyncClient(path) as c:
        await _create(c, "cnt")
        await c.call("vm.start", {"vm_id": "cnt"})
        await _progress_beyond(c, "cnt", [0, 0])
        full = await c.call("snapshot.create", {
            "vm_id": "cnt", "snapshot_path": f"{d}/full.snap", "mem_file_path": f"{d}/full.mem",
        })  # fmt: skip
        assert full["snapshot_type"] == "Full" and full["pages_written"] > 0
        after_full = await c.call("vm.describe", {"vm_id": "cnt"})
        assert after_full["state"] == "Running"
        await _progress_beyond(c, "cnt", after_full["guest_progress"])  # dirty since the Full
        saved = (await c.call("vm.pause", {"vm_id": "cnt"}))["guest_progress"]
        diff = await c.call("snapshot.create", {
            "vm_id": "cnt", "snapshot_type": "Diff",
            "snapshot_path": f"{d}/diff.snap", "mem_file_path": f"{d}/diff.mem",
        })  # fmt: skip
        assert diff["snapshot_type"] == "Diff"
        assert 0 < diff["pages_written"] < full["pages_written"]
        await c.call("vm.destroy", {"vm_id": "cnt"})
        rebased = await c.call("snapshot.rebase", {
            "base_snapshot_path": f"{d}/full.snap", "diff_snapshot_path": f"{d}/diff.snap",
            "output_snapshot_path": f"{d}/merged.snap",
        })  # fmt: skip
        assert rebased["output_mem_file_path"] == f"{d}/merged.mem"
        described = await c.call("snapshot.describe", {
            "snapshot_path": f"{d}/merged.snap", "verify": "full",
        })  # fmt: skip
        assert described["ok"] is True and described["manifest"]["kind"] == "Full"
        await _create(c, "cnt")  # a NotStarted VM of that id is filled by the load
        loaded = await c.call("snapshot.load", {
            "vm_id": "cnt", "snapshot_path": f"{d}/merged.snap",
            "mem_backend": {"backend_type": "File", "backend_path": f"{d}/merged.mem"},
        })  # fmt: skip
        assert loaded["vm"]["state"] == "Paused"
        assert loaded["vm"]["guest_progress"] == saved  # exactly where it was saved
        await c.call("vm.resume", {"vm_id": "cnt"})
        await _progress_beyond(c, "cnt", saved)  # and it goes on from there
        running = await _error(c.call("snapshot.load", {
            "vm_id": "cnt", "snapshot_path": f"{d}/merged.snap",
            "mem_file_path": f"{d}/merged.mem",
        }))  # fmt: skip
        assert running.code == -32003


async def test_diff_without_dirty_tracking_is_refused(daemon: tuple[Server, str],
                                                      sockdir: str) -> None:  # fmt: skip
    _, path = daemon
    async with AsyncClient(path) as c:
        await _create(c, "nodirty", dirty=False)
        await c.call("vm.start", {"vm_id": "nodirty"})
        error = await _error(c.call("snapshot.create", {
            "vm_id": "nodirty", "snapshot_type": "Diff",
            "snapshot_path": f"{sockdir}/d.snap", "mem_file_path": f"{sockdir}/d.mem",
        }))  # fmt: skip
    assert error.code == -32003
    assert error.data == {
        "kind": "DiffNotAllowed",
        "fault_message": "Diff snapshots are not allowed on uVMs with dirty page tracking "
        "disabled.",
    }
    assert not os.path.exists(f"{sockdir}/d.snap")


async def test_load_needs_exactly_one_memory_source(daemon: tuple[Server, str]) -> None:
    _, path = daemon
    async with AsyncClient(path) as c:
        both = await _error(c.call("snapshot.load", {
            "vm_id": "x", "snapshot_path": "/tmp/a.snap", "mem_file_path": "/tmp/a.mem",
            "mem_backend": {"backend_type": "File", "backend_path": "/tmp/a.mem"},
        }))  # fmt: skip
        neither = await _error(c.call("snapshot.load", {
            "vm_id": "x", "snapshot_path": "/tmp/a.snap"}))  # fmt: skip
    assert both.code == neither.code == -32602
    assert "exactly one of mem_backend and mem_file_path" in both.message


async def test_debug_memory_access_and_write_marks_dirty(daemon: tuple[Server, str],
                                                         sockdir: str) -> None:  # fmt: skip
    _, path = daemon
    d = sockdir
    payload = b"squibd!" * 100
    addr = 32 * _MIB
    async with AsyncClient(path) as c:
        await _create(c, "mem", vcpus=1)
        await c.call("vm.start", {"vm_id": "mem"})
        await c.call("vm.pause", {"vm_id": "mem"})
        await c.call("snapshot.create", {
            "vm_id": "mem", "snapshot_path": f"{d}/f.snap", "mem_file_path": f"{d}/f.mem"})
        written = await c.call("vm.write_memory", {
            "vm_id": "mem", "guest_addr": addr,
            "data_base64": base64.b64encode(payload).decode(),
        })  # fmt: skip
        assert written == {"bytes_written": len(payload)}
        read = await c.call("vm.read_memory",
                            {"vm_id": "mem", "guest_addr": addr, "length": len(payload)})
        assert base64.b64decode(read["data_base64"]) == payload
        diff = await c.call("snapshot.create", {
            "vm_id": "mem", "snapshot_type": "Diff",
            "snapshot_path": f"{d}/d.snap", "mem_file_path": f"{d}/d.mem",
        })  # fmt: skip
        assert diff["pages_written"] == 1  # the paused guest wrote nothing; our page did
        too_long = await _error(c.call("vm.read_memory",
                                       {"vm_id": "mem", "guest_addr": 0, "length": _MIB + 1}))
        assert too_long.code == -32602 and "params.length" in too_long.message
        outside = await _error(c.call("vm.read_memory",
                                      {"vm_id": "mem", "guest_addr": 1 << 40, "length": 8}))
        assert outside.code == -32602 and outside.kind == "GuestAddressError"


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


async def _save_until_first_progress(
    c: AsyncClient, params: dict[str, Any], on_first: Any
) -> tuple[Any, list[tuple[str, int, int]]]:
    """Start snapshot.create with progress; run ``on_first(request_id)`` at the first report."""
    seen: list[tuple[str, int, int]] = []
    request_ids: list[int] = []
    first = trio.Event()

    def progress(phase: str, done: int, total: int) -> None:
        seen.append((phase, done, total))
        first.set()

    outcome: list[Any] = []
    async with trio.open_nursery() as nursery:

        async def save() -> None:
            try:
                outcome.append(await c.call("snapshot.create", params, on_progress=progress,
                                            on_sent=request_ids.append))  # fmt: skip
            except SquibdError as exc:
                outcome.append(exc)

        nursery.start_soon(save)
        await first.wait()
        await on_first(request_ids[0])
    return outcome[0], seen


async def test_cancel_mid_save_rolls_back(daemon: tuple[Server, str], sockdir: str) -> None:
    server, path = daemon
    d = sockdir
    params = {"vm_id": "big", "snapshot_path": f"{d}/p.snap", "mem_file_path": f"{d}/p.mem"}
    async with AsyncClient(path) as c:
        await _create(c, "big", mib=FILL_SIZE // _MIB + 128)
        await c.call("vm.start", {"vm_id": "big"})
        await c.call("snapshot.create", params)  # the previous pair
        before = {name: _digest(f"{d}/{name}") for name in ("p.snap", "p.mem")}
        await trio.to_thread.run_sync(_fill, server, "big")
        answer, seen = await _save_until_first_progress(c, params, c.cancel)
        assert answer.code == -32800 and answer.kind == "Cancelled"
        assert seen[0][0] == "memory" and 0 < seen[0][1] <= seen[0][2]
        assert (await c.call("vm.describe", {"vm_id": "big"}))["state"] == "Running"
    assert sorted(os.listdir(d)) == ["p.mem", "p.snap", "s.sock"]  # no temp files left
    assert {name: _digest(f"{d}/{name}") for name in ("p.snap", "p.mem")} == before


async def test_second_save_of_a_vm_is_busy_other_vms_proceed(
    daemon: tuple[Server, str], sockdir: str
) -> None:
    server, path = daemon
    d = sockdir
    async with AsyncClient(path) as c, AsyncClient(path) as other:
        await _create(c, "a", mib=FILL_SIZE // _MIB + 128)
        await _create(c, "b", vcpus=1)
        for vm in ("a", "b"):
            await c.call("vm.start", {"vm_id": vm})
        await trio.to_thread.run_sync(_fill, server, "a")
        results: dict[str, Any] = {}

        async def while_saving(_request_id: int) -> None:
            results["again"] = await _error(other.call("snapshot.create", {
                "vm_id": "a", "snapshot_path": f"{d}/a2.snap", "mem_file_path": f"{d}/a2.mem"}))
            results["b"] = await other.call("snapshot.create", {
                "vm_id": "b", "snapshot_path": f"{d}/b.snap", "mem_file_path": f"{d}/b.mem"})

        first, _ = await _save_until_first_progress(
            c, {"vm_id": "a", "snapshot_path": f"{d}/a.snap", "mem_file_path": f"{d}/a.mem"},
            while_saving,
        )
    assert first["pages_written"] >= FILL_SIZE // os.sysconf("SC_PAGE_SIZE")
    assert results["again"].code == -32004 and results["again"].kind == "Busy"
    assert results["b"]["snapshot_type"] == "Full"
    assert not os.path.exists(f"{d}/a2.snap")


async def test_disconnect_mid_save_still_commits(sockdir: str) -> None:
    d = sockdir
    path = f"{d}/s.sock"
    params = {"vm_id": "gone", "snapshot_path": f"{d}/g.snap", "mem_file_path": f"{d}/g.mem",
              "progress_token": "t"}  # fmt: skip
    async with running_server(path) as server:
        async with AsyncClient(path) as c:
            await _create(c, "gone", mib=FILL_SIZE // _MIB + 128)
            await c.call("vm.start", {"vm_id": "gone"})
        await trio.to_thread.run_sync(_fill, server, "gone")
        stream = await trio.open_unix_socket(path)
        await stream.send_all(
            b'{"jsonrpc":"2.0","id":1,"method":"snapshot.create","params":'
            + __import__("json").dumps(params).encode() + b"}\n"
        )
        first = await stream.receive_some(4096)  # the first $/progress
        assert b'"$/progress"' in first
        await stream.aclose()  # the client goes away mid-save
        # leaving running_server stops gracefully: it waits for the save in flight
    described = await _describe_offline(f"{d}/g.snap")
    assert described["ok"] is True
    assert described["manifest"]["bytes_written"] >= FILL_SIZE


async def _describe_offline(path: str) -> dict[str, Any]:
    from squibd.snapshot.describe import describe_snapshot

    result: dict[str, Any] = describe_snapshot(path, verify="size").to_json()
    return result


async def test_uffd_load_through_a_page_server(daemon: tuple[Server, str], sockdir: str) -> None:
    _, path = daemon
    d = sockdir
    async with AsyncClient(path) as c:
        await _create(c, "lazy", dirty=False)
        await c.call("vm.start", {"vm_id": "lazy"})
        await _progress_beyond(c, "lazy", [0, 0])
        saved = (await c.call("vm.pause", {"vm_id": "lazy"}))["guest_progress"]
        await c.call("snapshot.create", {
            "vm_id": "lazy", "snapshot_path": f"{d}/l.snap", "mem_file_path": f"{d}/l.mem"})
        await c.call("vm.destroy", {"vm_id": "lazy"})
        server = await trio.lowlevel.open_process(
            [sys.executable, "-m", "squibd.cli.daemon", "--page-server",
             "--snapshot", f"{d}/l.snap", "--socket", f"{d}/ps.sock"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            first = b""
            while b"\n" not in first:  # "listening PATH"
                first += await server.stdout.receive_some(4096)
            assert first.startswith(b"listening")
            loaded = await c.call("snapshot.load", {
                "vm_id": "lazy", "snapshot_path": f"{d}/l.snap",
                "mem_backend": {"backend_type": "Uffd", "backend_path": f"{d}/ps.sock"},
                "resume_vm": True,
            })  # fmt: skip
            assert loaded["vm"]["state"] == "Running"
            await _progress_beyond(c, "lazy", saved)
            await c.call("vm.destroy", {"vm_id": "lazy"})
            with trio.fail_after(60):  # a hang guard: the server exits when its VM is gone
                assert await server.wait() == 0
        finally:
            if server.returncode is None:
                server.kill()
                await server.wait()


async def test_in_flight_limit_serializes_a_connection(sockdir: str) -> None:
    d = sockdir
    path = f"{d}/s.sock"
    # With one call in flight per connection, a pipelined second save of the same VM
    # waits for the first instead of being refused as busy.
    async with running_server(path, max_in_flight=1), AsyncClient(path) as c:
        await _create(c, "one", vcpus=1)
        await c.call("vm.start", {"vm_id": "one"})
        answers: list[Any] = []
        async with trio.open_nursery() as nursery:
            for name in ("x", "y"):
                params = {"vm_id": "one", "snapshot_path": f"{d}/{name}.snap",
                          "mem_file_path": f"{d}/{name}.mem"}  # fmt: skip

                async def save(p: dict[str, Any] = params) -> None:
                    answers.append(await c.call("snapshot.create", p))

                nursery.start_soon(save)
    assert len(answers) == 2
    assert all(a["snapshot_type"] == "Full" for a in answers)


async def test_every_declared_guest_parameter_is_accepted_by_the_runtime(
    daemon: tuple[Server, str],
) -> None:
    from squibd.api.models import GUEST_PARAMETERS

    _, path = daemon
    async with AsyncClient(path) as c:
        for program, names in GUEST_PARAMETERS.items():
            guest = {"program": program, **dict.fromkeys(names, 1)}
            info = await c.call("vm.create", {"vm_id": f"g-{program}", "vcpu_count": 1,
                                              "mem_size_mib": 64, "guest": guest})  # fmt: skip
            assert info["guest_program"] == program
