"""Issue 10: cancel races, error boundaries and per-request log levels (in-process server)."""

from __future__ import annotations

import json
import logging
from typing import Any

import attrs
import pytest
import trio

from squibd.api import methods
from squibd.rpc import MAX_BATCH
from squibd.server import _connection
from tests.server.helpers import read_lines, request, running_server


def _cancel(request_id: int) -> bytes:
    message = {"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": request_id}}
    return json.dumps(message).encode() + b"\n"


def _rebase(request_id: int, sockdir: str) -> dict[str, Any]:
    params = {
        "base_snapshot_path": f"{sockdir}/base.snap",
        "diff_snapshot_path": f"{sockdir}/diff.snap",
        "output_snapshot_path": f"{sockdir}/out.snap",
    }
    return {"jsonrpc": "2.0", "id": request_id, "method": "snapshot.rebase", "params": params}


async def test_cancel_in_the_same_read_as_its_request_cancels_it(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    data = json.dumps(_rebase(1, sockdir)).encode() + b"\n" + _cancel(1)
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(data)  # one write: the daemon reads both lines at once
            [answer] = await read_lines(stream, 1)
    assert answer["id"] == 1
    assert answer["error"]["code"] == -32800 and answer["error"]["data"]["kind"] == "Cancelled"


async def test_cancel_in_the_same_batch_as_its_request_cancels_it(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    cancel = json.loads(_cancel(1))
    batch = [_rebase(1, sockdir), cancel, json.loads(request(2, "vm.list"))]
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(json.dumps(batch).encode() + b"\n")
            [answers] = await read_lines(stream, 1)
    by_id = {a["id"]: a for a in answers}
    assert set(by_id) == {1, 2}
    assert by_id[1]["error"]["code"] == -32800
    assert by_id[2]["result"] == {"vms": []}


async def _fake_broken_handler(api: Any, call: Any, params: Any) -> Any:
    raise KeyError("squibd_internal_secret")


@pytest.mark.parametrize("inline", [True, False])
async def test_fake_handler_bug_answers_32603_without_naming_the_class(
    sockdir: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, inline: bool
) -> None:
    spec = attrs.evolve(methods.METHODS["vm.list"], handler=_fake_broken_handler, inline=inline)
    monkeypatch.setitem(methods.METHODS, "vm.list", spec)
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(request(1, "vm.list") + request(2, "daemon.status"))
            answers = await read_lines(stream, 2)
    by_id = {a["id"]: a for a in answers}
    error = by_id[1]["error"]
    assert error["code"] == -32603
    assert "KeyError" not in json.dumps(error) and "squibd_internal_secret" not in error["message"]
    incident = error["data"]["incident"]
    assert "result" in by_id[2], "the connection stays usable"
    logged = [r for r in caplog.records if incident in r.getMessage()]
    assert logged and logged[0].exc_info is not None, "logged with its traceback"


async def test_fake_failure_outside_dispatch_is_answered_32603(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in the call machinery itself (not in a handler): the call's boundary answers.
    async def broken(self: Any, call_request: Any, scope: Any) -> Any:
        raise RuntimeError("machinery bug")

    monkeypatch.setattr(_connection.ClientConnection, "_answer", broken)
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(request(1, "vm.destroy", {"vm_id": "a"}))
            [answer] = await read_lines(stream, 1)
    assert answer["id"] == 1 and answer["error"]["code"] == -32603
    assert "RuntimeError" not in json.dumps(answer)


async def test_fake_connection_failure_closes_only_that_connection(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = _connection.ClientConnection._start_batch

    async def broken(self: Any, batch: Any) -> None:
        raise RuntimeError("reader bug")

    monkeypatch.setattr(_connection.ClientConnection, "_start_batch", broken)
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        other = await trio.open_unix_socket(path)
        victim = await trio.open_unix_socket(path)
        async with other, victim:
            await victim.send_all(b'[{"jsonrpc":"2.0","id":1,"method":"vm.list"}]\n')
            assert await victim.receive_some(100) == b"", "the failing connection is closed"
            monkeypatch.setattr(_connection.ClientConnection, "_start_batch", original)
            await other.send_all(request(2, "daemon.status"))
            [answer] = await read_lines(other, 1)
    assert answer["id"] == 2 and "result" in answer


async def test_read_only_methods_log_at_debug_others_at_info(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="squibd.server")
    path = f"{sockdir}/s.sock"
    calls = [request(1, "daemon.status"), request(2, "vm.list"),
             request(3, "vm.describe", {"vm_id": "a"}),
             request(4, "snapshot.describe", {"snapshot_path": f"{sockdir}/none.snap"}),
             request(5, "vm.destroy", {"vm_id": "a"})]  # fmt: skip
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(b"".join(calls))
            await read_lines(stream, len(calls))
    levels = {}
    for record in caplog.records:
        message = record.getMessage()
        if message.startswith("peer=") and " method=" in message:
            method = message.split(" method=")[1].split()[0]
            assert method not in levels, "one line per request"
            levels[method] = record.levelno
    assert levels == {
        "daemon.status": logging.DEBUG,
        "vm.list": logging.DEBUG,
        "vm.describe": logging.DEBUG,
        "snapshot.describe": logging.DEBUG,
        "vm.destroy": logging.INFO,
    }


async def test_a_batch_of_the_largest_size_is_answered_whole(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    batch = [json.loads(request(i, "daemon.status")) for i in range(MAX_BATCH)]
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(json.dumps(batch).encode() + b"\n")
            [answers] = await read_lines(stream, 1)
    assert sorted(a["id"] for a in answers) == list(range(MAX_BATCH))
