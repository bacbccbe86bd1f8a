"""Issue 10, "unbounded resources": VM limits and running out of file descriptors.

One client could create VMs until the daemon ran out of fds (new
connections then hung) and a 1 TiB VM was accepted on a 24 GiB host. Now
``[limits]`` (``max_vms``, ``max_vcpus_total``, ``max_guest_memory_mib``,
default the host's RAM) refuse with -32004 naming the limit; VMs that would
eat into the fds kept for connections are refused with ResourceExhausted
(-32004), as is an EMFILE met while building one, and nothing of the
refused VM is left behind.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from squibd.api.errors import map_exception
from squibd.rpc import BUSY
from squibd.vm._threads import run_blocking
from squibd.vm.build import build_fresh
from squibd.vm.errors import LimitReached, ResourceExhausted
from squibd.vm.limits import RuntimeLimits, fds_per_vm, host_memory_mib
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime, _typed_exhaustion

from ..server.helpers import blocking_call, daemon_command
from ._peers import save_counter_pair

pytestmark = pytest.mark.kvm

#: RLIMIT_NOFILE of the child daemon: room for a few 32-vCPU VMs and the reserve.
_CHILD_NOFILE = 200
_TIB_MIB = 1024 * 1024


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1


@contextmanager
def _nofile(soft: int) -> Iterator[None]:
    """Lower this process's RLIMIT_NOFILE soft limit for the block (a real limit)."""
    old_soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old_soft, hard))


def _start_limited_daemon(directory: str, config: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(directory, "s.sock")
    notify_path = os.path.join(directory, "notify")
    config_path = os.path.join(directory, "squibd.toml")
    with open(config_path, "w") as f:
        f.write(config)

    def lower_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_CHILD_NOFILE, _CHILD_NOFILE))

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(60)  # hang guard
        proc = subprocess.Popen(
            daemon_command("--socket", path, "--config", config_path),
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
            preexec_fn=lower_nofile,
        )
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    return proc, path


def _create(path: str, vm_id: str, vcpus: int, mib: int) -> Any:
    return blocking_call(path, "vm.create", {
        "vm_id": vm_id, "vcpu_count": vcpus, "mem_size_mib": mib,
        "guest": {"program": "counter"},
    }, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("isolation", "vcpus"),
    # In-process, the vCPU fds are the daemon's; a VM process holds its own, so there
    # the daemon runs out of fds for the VMs' memory and sockets (1 vCPU keeps it light).
    [("inprocess", 32), ("process", 1)],
)
def test_fd_exhaustion_is_refused_typed_and_connections_still_work(
    sockdir: str, isolation: str, vcpus: int
) -> None:
    config = f'[server]\nvm_isolation = "{isolation}"\n[limits]\nfd_reserve = 64\n'
    proc, path = _start_limited_daemon(sockdir, config)
    try:
        created: list[str] = []
        refusal: Any = None
        for n in range(_CHILD_NOFILE // fds_per_vm(vcpus, in_process=False) * 4):
            answer = _create(path, f"big{n}", vcpus, 2)
            if "error" in answer:
                refusal = answer["error"]
                break
            created.append(f"big{n}")
        assert created, "not even one VM fitted under the lowered RLIMIT_NOFILE"
        assert refusal is not None
        assert refusal["code"] == -32004, refusal
        assert refusal["data"]["kind"] == "ResourceExhausted"
        assert "file descriptors" in refusal["message"]
        assert "Internal error" not in refusal["message"]

        # The reserve keeps the daemon reachable: many connections at once all answer.
        clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(16)]
        try:
            for client in clients:
                client.settimeout(60)
                client.connect(path)
            for client in clients:
                client.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n')
            for client in clients:
                assert b'"vm_count"' in client.recv(65536)
        finally:
            for client in clients:
                client.close()

        # A 1 TiB VM on a smaller host is refused by max_guest_memory_mib.
        huge = _create(path, "huge", 1, _TIB_MIB)["error"]
        assert huge["code"] == -32004 and huge["data"]["kind"] == "LimitReached"
        assert "max_guest_memory_mib limit reached" in huge["message"]

        # Freeing a VM makes room again.
        assert "result" in blocking_call(path, "vm.destroy", {"vm_id": created[0]})
        assert "result" in _create(path, "again", vcpus, 2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_limits_refuse_with_busy_naming_the_limit_and_release_on_destroy() -> None:
    limits = RuntimeLimits(max_vms=2, max_vcpus_total=3, max_guest_memory_mib=64)
    rt = Runtime(limits=limits)
    try:
        await rt.create_vm("a", 1, 16, False)
        await rt.create_vm("b", 2, 16, False)
        with pytest.raises(LimitReached, match=r"max_vms limit reached \(2 VMs\)") as info:
            await rt.create_vm("c", 1, 16, False)
        wire = map_exception(info.value)
        assert wire is not None and wire.error.code == BUSY
        await rt.destroy("a")
        with pytest.raises(LimitReached, match=r"max_vcpus_total limit reached \(3 vCPUs\)"):
            await rt.create_vm("c", 2, 16, False)
        with pytest.raises(LimitReached, match=r"max_guest_memory_mib limit reached \(64 MiB\)"):
            await rt.create_vm("c", 1, 49, False)
        assert rt.list() == ["b"]  # nothing of the refused VMs is left
        await rt.create_vm("c", 1, 48, False)
        assert rt.list() == ["b", "c"]
    finally:
        await rt.aclose()


async def test_concurrent_creates_cannot_overshoot_max_vms() -> None:
    rt = Runtime(limits=RuntimeLimits(max_vms=1))
    outcomes: list[str] = []

    async def create(vm_id: str) -> None:
        try:
            await rt.create_vm(vm_id, 1, 16, False)
            outcomes.append("ok")
        except LimitReached:
            outcomes.append("refused")

    try:
        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(create, f"v{n}")
        assert sorted(outcomes) == ["ok", "refused", "refused", "refused"]
        assert len(rt.list()) == 1
    finally:
        await rt.aclose()


def test_load_over_a_limit_is_refused_before_mapping(tmp_path: Path) -> None:
    snap, mem = save_counter_pair(tmp_path, vcpus=2)

    async def run() -> None:
        rt = Runtime(limits=RuntimeLimits(max_vcpus_total=3))
        try:
            await rt.create_vm("a", 2, 16, False)
            with pytest.raises(LimitReached, match="max_vcpus_total"):
                await rt.load("b", snap, MemBackend("File", mem))
            assert rt.list() == ["a"]
            await rt.destroy("a")
            await rt.load("b", snap, MemBackend("File", mem))
            assert rt.list() == ["b"]
        finally:
            await rt.aclose()

    trio.run(run)


async def test_fd_headroom_refuses_before_building() -> None:
    rt = Runtime(limits=RuntimeLimits(fd_reserve=16))
    try:
        before = _open_fds()
        limit = before + fds_per_vm(1) + 8  # short of the 16 kept in reserve
        with _nofile(limit), pytest.raises(ResourceExhausted, match="file descriptors") as info:
            await rt.create_vm("tight", 1, 16, False)
        assert "RLIMIT_NOFILE" in str(info.value)
        assert rt.list() == [] and _open_fds() == before
    finally:
        await rt.aclose()


async def test_emfile_while_building_is_resource_exhausted_and_leaks_nothing() -> None:
    token = trio.lowlevel.current_trio_token()
    limiter = trio.CapacityLimiter(1)

    def build() -> object:
        return build_fresh("emfile", 4, 16, False, GuestSpec(), token=token,
                           quiesce_timeout_s=1.0)  # fmt: skip

    await run_blocking(lambda: None, limiter)  # the worker thread exists before the limit
    before = _open_fds()
    for spare in (0, 1, 2, 3):  # run out at each of the first steps (memfd, /dev/kvm, VM, vCPU)
        expected = r"out of file descriptors \(EMFILE"
        with _nofile(before + spare), pytest.raises(ResourceExhausted, match=expected):
            await _typed_exhaustion("emfile", run_blocking(build, limiter))
        assert _open_fds() == before


def test_default_memory_limit_is_the_host_ram() -> None:
    assert RuntimeLimits().guest_memory_mib == host_memory_mib() > 0
