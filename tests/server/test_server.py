"""The trio server over a real Unix socket: errors, limits, batches, credentials."""

from __future__ import annotations

import json
import os
import socket
import stat

import pytest
import trio

from squibd.client import AsyncClient, SquibdError
from squibd.server import DaemonAlreadyRunning, SocketPathOccupied, bind_unix_socket

from .helpers import raw_exchange, read_lines, request, running_server

#: An unprivileged uid that exists on Debian (nobody).
NOBODY = 65534


async def test_status_over_a_real_socket(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path), AsyncClient(path) as client:
        status = await client.call("daemon.status")
    assert status["pid"] == os.getpid()
    assert status["version"]
    assert status["vm_count"] == 0
    assert status["kvm_available"] == os.access("/dev/kvm", os.R_OK | os.W_OK)


async def test_socket_is_created_with_mode_0600(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
    assert not os.path.exists(path), "the socket file is removed at stop"


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{oops\n", -32700),
        (b'{"jsonrpc":"2.0","id":1}\n', -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"no.such"}\n', -32601),
        (b'{"jsonrpc":"2.0","id":1,"method":"daemon.status","params":{"x":1}}\n', -32602),
        (b'{"jsonrpc":"2.0","id":1,"method":"vm.describe","params":{"vm_id":"ghost"}}\n', -32002),
        (b'{"jsonrpc":"2.0","id":1,"method":"vm.read_memory",'
         b'"params":{"vm_id":"a","guest_addr":0,"length":1}}\n', -32005),
        (b'{"jsonrpc":"2.0","id":1,"method":"snapshot.create","params":{"vm_id":"a",'
         b'"snapshot_path":"rel.snap","mem_file_path":"/tmp/x.mem"}}\n', -32001),
    ],
)  # fmt: skip
async def test_each_error_code_over_the_socket(sockdir: str, line: bytes, code: int) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        [answer] = await raw_exchange(path, line, lines=1)
    assert answer["error"]["code"] == code
    if code in (-32001, -32002, -32005):
        data = answer["error"]["data"]
        assert set(data) == {"kind", "fault_message"}
        assert data["fault_message"] == answer["error"]["message"]


async def test_invalid_params_message_names_the_field_path(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    params = {
        "vm_id": "v", "snapshot_path": "/tmp/a.snap",
        "mem_backend": {"backend_type": "Disk", "backend_path": "/tmp/a.mem"},
    }  # fmt: skip
    async with running_server(path):
        [answer] = await raw_exchange(path, request(1, "snapshot.load", params), lines=1)
    assert answer["error"]["code"] == -32602
    assert "params.mem_backend.backend_type" in answer["error"]["message"]


async def test_snapshot_error_carries_spec_message(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    params = {"vm_id": "a", "snapshot_path": "/tmp/../x.snap", "mem_file_path": "/tmp/x.mem"}
    async with running_server(path):
        [answer] = await raw_exchange(path, request(1, "snapshot.create", params), lines=1)
    data = answer["error"]["data"]
    assert data["kind"] == "InvalidPath"
    assert data["fault_message"].startswith("invalid snapshot path: ")


async def test_oversize_line_then_valid_request_on_same_connection(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    huge = b'{"jsonrpc":"2.0","id":1,"method":"' + b"x" * (1024 * 1024 + 10) + b'"}\n'
    async with running_server(path):
        answers = await raw_exchange(path, huge + request(2, "daemon.status"), lines=2)
    assert answers[0]["error"]["code"] == -32600
    assert answers[0]["id"] is None
    assert answers[1]["id"] == 2
    assert "result" in answers[1]


async def test_batch_answers_in_one_array(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    batch = [
        {"jsonrpc": "2.0", "id": "a", "method": "daemon.status"},
        {"jsonrpc": "2.0", "method": "daemon.status"},  # a notification: no answer
        {"jsonrpc": "2.0", "id": "b", "method": "nope"},
        17,
    ]
    async with running_server(path):
        [answer] = await raw_exchange(path, json.dumps(batch).encode() + b"\n", lines=1)
    assert isinstance(answer, list)
    by_id = {item["id"]: item for item in answer}
    assert set(by_id) == {"a", "b", None}
    assert "result" in by_id["a"]
    assert by_id["b"]["error"]["code"] == -32601
    assert by_id[None]["error"]["code"] == -32600


async def test_two_hundred_concurrent_clients(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    results: list[int] = []
    async with running_server(path) as server:

        async def one(i: int) -> None:
            async with AsyncClient(path) as client:
                status = await client.call("daemon.status")
                results.append(status["pid"])

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(one, i)
        assert server.connection_count >= 0
    assert results == [os.getpid()] * 200


async def test_stalled_half_line_does_not_delay_others(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        staller = await trio.open_unix_socket(path)
        async with staller:
            await staller.send_all(b'{"jsonrpc":"2.0","id":1,"meth')
            with trio.fail_after(30):  # a hang guard, not a timing assertion
                async with AsyncClient(path) as client:
                    status = await client.call("daemon.status")
            assert status["pid"] == os.getpid()
            await staller.send_all(b'od":"daemon.status"}\n')
            [answer] = await read_lines(staller, 1)
    assert answer["id"] == 1 and "result" in answer


async def test_connection_limit_refuses_with_busy(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path, max_connections=2):
        async with AsyncClient(path) as a, AsyncClient(path) as b:
            await a.call("daemon.status")
            await b.call("daemon.status")
            [answer] = await raw_exchange(path, request(1, "daemon.status"), lines=1)
        assert answer["error"]["code"] == -32004
        assert answer["error"]["data"]["kind"] == "TooManyConnections"
        async with AsyncClient(path) as c:
            assert (await c.call("daemon.status"))["pid"] == os.getpid()


async def test_idle_connection_is_closed(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path, idle_timeout_s=0.05):
        stream = await trio.open_unix_socket(path)
        async with stream:
            assert await stream.receive_some(100) == b""  # the server closed it


async def test_half_closed_client_still_gets_its_answer(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(request(9, "daemon.status"))
            await stream.send_eof()
            [answer] = await read_lines(stream, 1)
    assert answer["id"] == 9


async def test_duplicate_in_flight_id_is_refused(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    params = {"vm_id": "ghost"}
    async with running_server(path):
        answers = await raw_exchange(
            path, request(3, "vm.describe", params) + request(3, "vm.describe", params), lines=2
        )
    codes = sorted(a["error"]["code"] for a in answers)
    # The second copy is refused unless the first had already been answered.
    assert codes in ([-32600, -32002], [-32002, -32002])


async def test_debug_methods_need_debug_api(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path), AsyncClient(path) as client:
        with pytest.raises(SquibdError) as info:
            await client.call("vm.write_memory", {"vm_id": "a", "guest_addr": 0,
                                                  "data_base64": ""})  # fmt: skip
    assert info.value.code == -32005
    assert "--debug-api" in info.value.fault_message


def _child_call_as(uid: int, path: str, write_fd: int) -> None:
    """In a forked child: drop to ``uid``, call daemon.status, write the answer, exit."""
    try:
        os.setuid(uid)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(path)
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n')
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        os.write(write_fd, data)
        os._exit(0)
    except BaseException as exc:
        os.write(write_fd, repr(exc).encode())
        os._exit(1)


async def test_forked_client_with_another_uid_is_refused(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    os.chmod(sockdir, 0o755)
    # Mode 0666 so that the kernel lets the other uid connect: the refusal must
    # come from squibd's SO_PEERCRED check, not from the file mode.
    async with running_server(path, socket_mode=0o666):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            _child_call_as(NOBODY, path, write_fd)
        os.close(write_fd)
        try:
            _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
            data = os.read(read_fd, 65536)
        finally:
            os.close(read_fd)
        assert os.waitstatus_to_exitcode(status) == 0, data
        answer = json.loads(data)
        assert answer["error"]["code"] == -32005
        assert answer["error"]["data"]["kind"] == "NotAllowed"
        assert str(NOBODY) in answer["error"]["message"]
        # root (our uid) is still served
        async with AsyncClient(path) as client:
            assert (await client.call("daemon.status"))["pid"] == os.getpid()


def test_refuses_to_start_when_a_live_daemon_answers(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    live = bind_unix_socket(path, mode=0o600)
    try:
        with pytest.raises(DaemonAlreadyRunning):
            bind_unix_socket(path, mode=0o600)
    finally:
        live.close()


def test_replaces_a_stale_socket_file(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    fresh = bind_unix_socket(path, mode=0o600)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(path)
    finally:
        fresh.close()


def test_never_removes_a_file_that_is_not_a_socket(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(SocketPathOccupied):
        bind_unix_socket(path, mode=0o600)
    with open(path) as f:
        assert f.read() == "precious"


def test_configured_mode_and_group_are_applied(sockdir: str) -> None:
    import grp

    group = grp.getgrgid(0).gr_name
    path = f"{sockdir}/g.sock"
    sock = bind_unix_socket(path, mode=0o660, group=group)
    try:
        info = os.stat(path)
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_gid == 0
    finally:
        sock.close()


async def test_paths_outside_allowed_roots_are_refused(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    os.mkdir(f"{sockdir}/root")
    async with running_server(path, allowed_roots=(f"{sockdir}/root",)):
        outside, inside = await raw_exchange(
            path,
            request(1, "snapshot.describe", {"snapshot_path": f"{sockdir}/x.snap"})
            + request(2, "snapshot.describe", {"snapshot_path": f"{sockdir}/root/x.snap"}),
            lines=2,
        )
    assert outside["error"]["data"] == {
        "kind": "InvalidPath",
        "fault_message": "invalid snapshot path: snapshot_path is outside the allowed roots",
    }
    assert inside["result"]["ok"] is False  # allowed, but there is no such file
