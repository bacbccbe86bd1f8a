"""A third-party Firecracker client (firecracker-python's ``Api``) drives real squibd VMs.

The client is synchronous (requests over the Unix socket): it runs in a
worker thread while the daemon runs in this test's trio loop, or against a
``squibd --firecracker-api-socket`` subprocess.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import pytest
import trio
from firecracker.api import Api
from firecracker.exceptions import APIError

from squibd.api import ApiContext
from squibd.client import AsyncClient, SquibdError
from squibd.config import DaemonConfig, ServerConfig, SnapshotConfig
from squibd.server import Server, bind_unix_socket
from tests.server.helpers import daemon_command

from . import _schemas
from ._http import http

pytestmark = pytest.mark.kvm

_T = TypeVar("_T")
#: Generous bound for a guest to show progress on a noisy, shared host (a hang guard).
PROGRESS_TIMEOUT_S = 60.0
PATIENT_QUIESCE_S = 30.0
SHORT_QUIESCE_S = 0.5


@asynccontextmanager
async def daemon(sockdir: str, quiesce_timeout_s: float = PATIENT_QUIESCE_S
                 ) -> AsyncIterator[tuple[Server, AsyncClient]]:  # fmt: skip
    """squibd in this trio run (JSON-RPC on sockdir/s.sock) and a connected client."""
    path = os.path.join(sockdir, "s.sock")
    config = DaemonConfig(server=ServerConfig(socket=path), snapshot=SnapshotConfig())
    sock = bind_unix_socket(path, mode=0o600)
    server = Server(config, ApiContext(quiesce_timeout_s=quiesce_timeout_s), [sock], [path],
                    handle_signals=False)  # fmt: skip
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                async with AsyncClient(path) as client:
                    yield server, client
            finally:
                server.request_stop()
    finally:
        sock.close()


async def in_thread(fn: Callable[[], _T]) -> _T:
    return await trio.to_thread.run_sync(fn)


async def progress(client: AsyncClient, vm_id: str) -> list[int]:
    return list((await client.call("vm.describe", {"vm_id": vm_id}))["guest_progress"])


async def progress_beyond(client: AsyncClient, vm_id: str, floor: list[int]) -> list[int]:
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        while True:
            now = await progress(client, vm_id)
            if all(a > b for a, b in zip(now, floor, strict=True)):
                return now


async def create_with_socket(client: AsyncClient, vm_id: str, sock: str) -> dict[str, Any]:
    result: dict[str, Any] = await client.call("vm.create", {
        "vm_id": vm_id, "vcpu_count": 1, "mem_size_mib": 32,
        "guest": {"program": "counter"}, "api_socket": sock,
    })  # fmt: skip
    return result


async def test_client_configures_starts_snapshots_and_loads_squibd_vms(
    sockdir: str, tmp_path: Any
) -> None:
    sock_a, sock_b = os.path.join(sockdir, "a.sock"), os.path.join(sockdir, "b.sock")
    snap, mem = str(tmp_path / "a.snap"), str(tmp_path / "a.mem")
    async with daemon(sockdir) as (_server, client):
        await create_with_socket(client, "fc-a", sock_a)
        assert oct(os.stat(sock_a).st_mode & 0o777) == "0o600"
        fc = Api(sock_a)
        try:
            assert (await in_thread(fc.describe.get)).json()["state"] == "Not started"
            await in_thread(lambda: fc.machine_config.put(
                vcpu_count=2, mem_size_mib=64, track_dirty_pages=True))  # fmt: skip
            await in_thread(lambda: fc.boot.put(kernel_image_path="builtin:counter"))
            described = await client.call("vm.describe", {"vm_id": "fc-a"})
            assert (described["vcpu_count"], described["mem_size_mib"]) == (2, 64)
            await in_thread(lambda: fc.actions.put(action_type="InstanceStart"))
            await progress_beyond(client, "fc-a", [0, 0])
            for (method, target), schema in _schemas.RESPONSES.items():
                answer = await http(sock_a, method, target)
                assert answer.status == 200
                _schemas.check(schema, answer.body)
            assert (await http(sock_a, "GET", "/")).body["state"] == "Running"
            # Firecracker requires a Paused VM for a snapshot: so does squibd's API.
            with pytest.raises(APIError, match="Paused"):
                await in_thread(lambda: fc.create_snapshot.put(
                    snapshot_type="Full", snapshot_path=snap, mem_file_path=mem))  # fmt: skip
            await in_thread(lambda: fc.vm.patch(state="Paused"))
            saved = await progress(client, "fc-a")
            await in_thread(lambda: fc.create_snapshot.put(
                snapshot_type="Full", snapshot_path=snap, mem_file_path=mem))  # fmt: skip
            assert (await in_thread(fc.describe.get)).json()["state"] == "Paused"
            await in_thread(lambda: fc.vm.patch(state="Resumed"))
            later = await progress_beyond(client, "fc-a", saved)
            # A Diff (the VM tracks dirty pages) holds what changed since the Full.
            await in_thread(lambda: fc.vm.patch(state="Paused"))
            diff_snap, diff_mem = str(tmp_path / "d.snap"), str(tmp_path / "d.mem")
            await in_thread(lambda: fc.create_snapshot.put(
                snapshot_type="Diff", snapshot_path=diff_snap, mem_file_path=diff_mem))  # fmt: skip
            described = await client.call("snapshot.describe", {"snapshot_path": diff_snap})
            assert described["ok"] and described["manifest"]["kind"] == "Diff"
            await in_thread(lambda: fc.vm.patch(state="Resumed"))
            await in_thread(lambda: fc.vm.patch(state="Resumed"))  # already Resumed: 204
            await progress_beyond(client, "fc-a", later)
            with pytest.raises(APIError, match="not allowed after the microVM started"):
                await in_thread(lambda: fc.machine_config.put(vcpu_count=1, mem_size_mib=32))
        finally:
            fc.close()

        # Load into a fresh VM created with api_socket (Firecracker's fresh process).
        await create_with_socket(client, "fc-b", sock_b)
        fc_b = Api(sock_b)
        try:
            await in_thread(lambda: fc_b.load_snapshot.put(
                snapshot_path=snap,
                mem_backend={"backend_type": "File", "backend_path": mem},
                enable_diff_snapshots=True, resume_vm=False,
            ))  # fmt: skip
            info = (await in_thread(fc_b.describe.get)).json()
            _schemas.check(_schemas.INSTANCE_INFO, info)
            assert (info["id"], info["state"]) == ("fc-b", "Paused")
            machine = (await in_thread(fc_b.machine_config.get)).json()
            assert (machine["vcpu_count"], machine["mem_size_mib"]) == (2, 64)
            assert machine["track_dirty_pages"] is True  # enable_diff_snapshots is its alias
            assert await progress(client, "fc-b") == saved  # exactly the saved instant
            with pytest.raises(APIError, match="not started"):
                await in_thread(lambda: fc_b.load_snapshot.put(
                    snapshot_path=snap, mem_file_path=mem))  # fmt: skip
            await in_thread(lambda: fc_b.vm.patch(state="Resumed"))
            await progress_beyond(client, "fc-b", saved)
        finally:
            fc_b.close()

        # vm.destroy closes the VM's API socket and removes the file.
        await client.call("vm.destroy", {"vm_id": "fc-b"})
        assert not os.path.exists(sock_b)
    assert not os.path.exists(sock_a)  # the daemon's stop removes the rest


async def test_api_socket_errors_leave_no_vm(sockdir: str) -> None:
    async with daemon(sockdir) as (_server, client):
        sock = os.path.join(sockdir, "a.sock")
        await create_with_socket(client, "one", sock)
        with pytest.raises(SquibdError) as info:
            await create_with_socket(client, "two", sock)  # a daemon listens there already
        assert info.value.code == -32602
        assert "params.api_socket" in info.value.message
        with pytest.raises(SquibdError) as info:
            await create_with_socket(client, "three", "relative.sock")
        assert "api_socket" in info.value.message
        assert [vm["vm_id"] for vm in (await client.call("vm.list"))["vms"]] == ["one"]


async def test_quiesce_timeout_answers_503(sockdir: str) -> None:
    async with daemon(sockdir, quiesce_timeout_s=SHORT_QUIESCE_S) as (server, client):
        sock = os.path.join(sockdir, "q.sock")
        await client.call("vm.create", {
            "vm_id": "stall", "vcpu_count": 2, "mem_size_mib": 32,
            "guest": {"program": "counter"}, "api_socket": sock,
        })  # fmt: skip
        assert (await http(sock, "PUT", "/actions", {"action_type": "InstanceStart"})).status == 204
        await progress_beyond(client, "stall", [0, 0])
        vm = server.api.runtime.get("stall")
        vm.arm_stall(1)
        assert await trio.to_thread.run_sync(vm.wait_stalled, 1, PROGRESS_TIMEOUT_S)
        try:
            answer = await http(sock, "PATCH", "/vm", {"state": "Paused"})
            assert answer.status == 503
            _schemas.check(_schemas.ERROR, answer.body)
            assert answer.body["fault_message"] == "a vCPU did not ack quiesce within the timeout"
            assert (await http(sock, "GET", "/")).body["state"] == "Running"
        finally:
            vm.release_stall(1)


@contextmanager
def slot_process(sockdir: str, name: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes],
                                                                        str]]:  # fmt: skip
    """``squibd --firecracker-api-socket`` as a subprocess; ready once it logs that it serves."""
    path = os.path.join(sockdir, f"{name}.sock")
    proc = subprocess.Popen(
        daemon_command("--firecracker-api-socket", path, *args), stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        for raw in proc.stderr:
            if b"serving Firecracker's API" in raw:
                break
        else:
            raise AssertionError(f"slot exited with {proc.wait()} before serving")
        yield proc, path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        if proc.stderr is not None:
            proc.stderr.close()


def test_empty_slot_process_boots_snapshots_and_loads(sockdir: str, tmp_path: Any) -> None:
    snap, mem = str(tmp_path / "s.snap"), str(tmp_path / "s.mem")
    with slot_process(sockdir, "one", "--id", "vm-one") as (proc, path):
        fc = Api(path)
        try:
            info = fc.describe.get().json()
            assert (info["id"], info["state"]) == ("vm-one", "Not started")
            fc.machine_config.put(vcpu_count=1, mem_size_mib=32)
            with pytest.raises(APIError, match="not kernel images"):
                fc.boot.put(kernel_image_path="/var/lib/vmlinux.bin")
            fc.boot.put(kernel_image_path="builtin:memwriter", boot_args="working_set_mib=2")
            fc.actions.put(action_type="InstanceStart")
            assert fc.describe.get().json()["state"] == "Running"
            fc.vm.patch(state="Paused")
            fc.create_snapshot.put(snapshot_type="Full", snapshot_path=snap, mem_file_path=mem)
            config = fc.vm_config.get().json()
            _schemas.check(_schemas.FULL_VM_CONFIGURATION, config)
            assert config["boot-source"]["kernel_image_path"] == "builtin:memwriter"
        finally:
            fc.close()
        with slot_process(sockdir, "two") as (proc_two, path_two):
            fc_two = Api(path_two)
            try:
                fc_two.load_snapshot.put(snapshot_path=snap, mem_file_path=mem, resume_vm=True)
                info = fc_two.describe.get().json()
                assert (info["id"], info["state"]) == ("anonymous-instance", "Running")
            finally:
                fc_two.close()
            proc_two.send_signal(signal.SIGTERM)
            assert proc_two.wait(timeout=60) == 0
            assert not os.path.exists(path_two)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not os.path.exists(path)
