"""squibd.client: typed methods match the method table; Client and AsyncClient on a real daemon."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal

import attrs
import pytest
import trio

from squibd.api.methods import METHODS
from squibd.client import AsyncClient, Client, DaemonUnreachable, SquibdError, method_name
from tests.server.helpers import running_server, start_daemon

#: Client-side arguments that are not wire params.
_CLIENT_ONLY = {"self", "on_progress"}


@pytest.mark.parametrize("rpc", sorted(METHODS))
def test_one_typed_method_per_rpc_method_with_the_wire_params(rpc: str) -> None:
    spec = METHODS[rpc]
    method = getattr(Client, method_name(rpc))
    signature = inspect.signature(method)
    wire = {f.name for f in attrs.fields(spec.params)} - {"progress_token"}
    assert set(signature.parameters) - _CLIENT_ONLY == wire
    assert ("on_progress" in signature.parameters) == spec.long_running
    required_on_wire = {f.name for f in attrs.fields(spec.params) if f.default is attrs.NOTHING}
    required_here = {
        name for name, p in signature.parameters.items()
        if p.default is inspect.Parameter.empty and name != "self"
    }  # fmt: skip
    assert required_here <= required_on_wire  # the client never demands more than the wire


def test_no_typed_method_without_an_rpc_method() -> None:
    typed = {n for n in vars(Client.__mro__[1]) if not n.startswith("_")}
    assert typed == {method_name(rpc) for rpc in METHODS}


def test_blocking_client_on_a_daemon_process(sockdir: str) -> None:
    proc, path = start_daemon(sockdir)
    try:
        with Client(path) as client:
            status = client.daemon_status()
            assert status["pid"] == proc.pid
            assert client.call("vm.list") == {"vms": []}
            with pytest.raises(SquibdError) as info:
                client.vm_describe("ghost")
        error = info.value
        assert (error.code, error.kind) == (-32002, "UnknownVm")
        assert "ghost" in error.fault_message
        assert error.method == "vm.describe"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_blocking_client_names_the_socket_when_no_daemon(sockdir: str) -> None:
    with pytest.raises(DaemonUnreachable, match=f"{sockdir}/none.sock"):
        Client(f"{sockdir}/none.sock").daemon_status()


def test_async_client_under_asyncio(sockdir: str) -> None:
    proc, path = start_daemon(sockdir)

    async def main() -> tuple[object, ...]:
        async with AsyncClient(path) as client:
            status, listed = await asyncio.gather(client.daemon_status(), client.vm_list())
            try:
                await client.snapshot_describe("relative.snap")
            except SquibdError as exc:
                return status, listed, exc
        raise AssertionError("a relative path was accepted")

    try:
        status, listed, error = asyncio.run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert status["pid"] == proc.pid  # type: ignore[index]
    assert listed == {"vms": []}
    assert isinstance(error, SquibdError) and error.kind == "InvalidPath"


async def test_async_client_under_trio(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path), AsyncClient(path) as client:
        results: list[object] = []
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(lambda: _append(results, client.daemon_status()))
        assert [r["pid"] for r in results] == [os.getpid()] * 3  # type: ignore[index]


async def _append(results: list[object], call: object) -> None:
    results.append(await call)  # type: ignore[misc]


def _readme_script() -> str:
    from tests.server.helpers import REPO

    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    section = text[text.index("## Client library"):]
    block = section[section.index("    from squibd.client import Client"):]
    lines = []
    for line in block.splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    return "\n".join(lines).strip() + "\n"


@pytest.mark.kvm
def test_the_readme_script_runs(sockdir: str) -> None:
    import subprocess
    import sys

    script = _readme_script()
    assert len(script.splitlines()) <= 6  # import, blank line, and the five lines
    proc, path = start_daemon(sockdir)
    try:
        with Client(path) as client:
            client.vm_create("web", mem_size_mib=32)
            client.vm_start("web")
        result = subprocess.run(
            [sys.executable, "-c", script.replace("/var/lib/squibd", sockdir)],
            capture_output=True, text=True, timeout=120,
            env={**os.environ, "SQUIBD_SOCKET": path},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("Z")  # created_at of the pair it just made
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.kvm
def test_interrupting_a_blocking_call_cancels_it_and_nothing_is_committed(sockdir: str) -> None:
    import base64

    proc, path = start_daemon(sockdir, "--debug-api")
    snaps = os.path.join(sockdir, "snaps")
    os.mkdir(snaps)
    reports: list[tuple[str, int, int]] = []
    pressed: list[bool] = []

    def progress(phase: str, done: int, total: int) -> None:
        reports.append((phase, done, total))
        if done < total and not pressed:  # the user presses Ctrl-C once, mid-save
            pressed.append(True)
            raise KeyboardInterrupt

    try:
        with Client(path) as client:
            client.vm_create("big", mem_size_mib=96)
            client.vm_start("big")
            half = 512 * 1024  # base64 of it fits the daemon's 1 MiB line limit
            for offset in range(16 << 20, 64 << 20, half):
                block = base64.b64encode(os.urandom(half)).decode()
                client.vm_write_memory("big", offset, block)
            with pytest.raises(SquibdError) as info:
                client.snapshot_create("big", f"{snaps}/b.snap", f"{snaps}/b.mem",
                                       on_progress=progress)  # fmt: skip
            assert info.value.cancelled and info.value.code == -32800
            assert client.vm_describe("big")["state"] == "Running"  # carries on
        assert pressed and os.listdir(snaps) == []  # rolled back: no pair, no temps
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


async def test_async_call_cancelled_by_its_scope_is_cancelled_in_the_daemon(
    sockdir: str,
) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path) as server, AsyncClient(path) as client:
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.daemon_status()
        assert scope.cancelled_caught
        assert (await client.vm_list()) == {"vms": []}  # the connection is still usable
        assert server.connection_count == 1


@pytest.mark.kvm
async def test_cancelling_an_async_call_rolls_the_save_back(sockdir: str) -> None:
    snaps = os.path.join(sockdir, "snaps")
    os.mkdir(snaps)
    path = f"{sockdir}/s.sock"
    async with running_server(path) as server, AsyncClient(path) as client:
        await client.vm_create("big", mem_size_mib=128)
        await client.vm_start("big")
        block = os.urandom(1 << 20)
        for mib in range(16, 112):
            await server.api.runtime.write_memory("big", mib << 20, block)
        with trio.CancelScope() as scope:

            def progress(phase: str, done: int, total: int) -> None:
                if done < total:
                    scope.cancel()

            await client.snapshot_create("big", f"{snaps}/b.snap", f"{snaps}/b.mem",
                                         on_progress=progress)  # fmt: skip
        assert scope.cancelled_caught
    # The server's graceful stop waited for the save to end: had $/cancelRequest not
    # reached it, the pair would have been committed.
    assert os.listdir(snaps) == []
