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
