"""Issue 10, documented limits: the largest request protocol/openrpc.json allows is sendable."""

from __future__ import annotations

import base64
import json
import os

import pytest
import trio

from squibd.api.models import MAX_MEMORY_ACCESS, MAX_WRITE_MEMORY, MAX_WRITE_MEMORY_BASE64
from squibd.api.openrpc import render_document
from squibd.client import AsyncClient, SquibdError
from squibd.rpc import DEFAULT_MAX_LINE
from tests.server.helpers import read_lines, running_server

_MIB = 1 << 20


def _documented_write_limit() -> int:
    document = json.loads(render_document())
    (method,) = [m for m in document["methods"] if m["name"] == "vm.write_memory"]
    (param,) = [p for p in method["params"] if p["name"] == "data_base64"]
    limit: int = param["schema"]["maxLength"]
    return limit


def _largest_write(data: bytes) -> bytes:
    # Every field at its documented maximum; json.dumps' default (spaced) separators.
    message = {
        "jsonrpc": "2.0",
        "id": "i" * 64,
        "method": "vm.write_memory",
        "params": {"vm_id": "v" * 64, "guest_addr": 2**64 - 1,
                   "data_base64": base64.b64encode(data).decode()},
    }  # fmt: skip
    return json.dumps(message).encode() + b"\n"


def test_the_documented_maximum_fits_the_line_cap() -> None:
    assert _documented_write_limit() == MAX_WRITE_MEMORY_BASE64
    assert len(base64.b64encode(bytes(MAX_WRITE_MEMORY))) == MAX_WRITE_MEMORY_BASE64
    line = _largest_write(bytes(MAX_WRITE_MEMORY))
    assert len(line) - 1 <= DEFAULT_MAX_LINE


async def test_the_largest_write_request_is_accepted(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path, debug_api=True):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(_largest_write(os.urandom(MAX_WRITE_MEMORY)))
            [answer] = await read_lines(stream, 1)
            # Framing and params passed: the only objection is that the VM does not exist.
            assert answer["error"]["code"] == -32002, answer["error"]
            await stream.send_all(_largest_write(os.urandom(MAX_WRITE_MEMORY + 1)))
            [answer] = await read_lines(stream, 1)
            assert answer["error"]["code"] == -32602
            assert "params.data_base64" in answer["error"]["message"]


@pytest.mark.kvm
async def test_largest_write_and_read_round_trip_through_squibctl_s_client(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    data = os.urandom(MAX_WRITE_MEMORY)
    async with running_server(path, debug_api=True), AsyncClient(path) as client:
        await client.call("vm.create", {
            "vm_id": "big", "vcpu_count": 1, "mem_size_mib": 8, "guest": {"program": "counter"},
        })  # fmt: skip
        written = await client.call("vm.write_memory", {
            "vm_id": "big", "guest_addr": 4 * _MIB,
            "data_base64": base64.b64encode(data).decode(),
        })  # fmt: skip
        assert written == {"bytes_written": MAX_WRITE_MEMORY}
        # The largest read (1 MiB, about 1.4 MB of answer) reaches the client whole.
        read = await client.call("vm.read_memory",
                                 {"vm_id": "big", "guest_addr": 4 * _MIB - (MAX_MEMORY_ACCESS
                                  - MAX_WRITE_MEMORY), "length": MAX_MEMORY_ACCESS})  # fmt: skip
        assert base64.b64decode(read["data_base64"]).endswith(data)
        with pytest.raises(SquibdError):
            await client.call("vm.read_memory",
                              {"vm_id": "big", "guest_addr": 0, "length": MAX_MEMORY_ACCESS + 1})
