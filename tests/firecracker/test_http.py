"""Firecracker's REST API on a real Unix socket: routes, status codes, bodies, refusals.

These need no guest: they drive an empty slot (no VM exists until
InstanceStart or a snapshot load). Every answer body is checked against the
schema of Firecracker's API description for its route.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import pytest

from squibd.api.firecracker import FIRECRACKER_API_VERSION
from squibd.server._firecracker import MAX_PAYLOAD_BYTES

from . import _schemas
from ._http import Answer, HttpClient, http, serving_slot


def _fault(answer: Answer, status: int = 400) -> str:
    assert answer.status == status, answer
    _schemas.check(_schemas.ERROR, answer.body)
    message: str = answer.body["fault_message"]
    return message


async def test_get_routes_answer_firecracker_bodies(sockdir: str) -> None:
    path = os.path.join(sockdir, "fc.sock")
    async with serving_slot(path, vm_id="vm-a"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for (method, target), schema in _schemas.RESPONSES.items():
            answer = await http(path, method, target)
            assert answer.status == 200, answer
            assert answer.headers["content-type"] == "application/json"
            _schemas.check(schema, answer.body)
        info = (await http(path, "GET", "/")).body
        assert info["id"] == "vm-a" and info["state"] == "Not started"
        version = (await http(path, "GET", "/version")).body
        assert version == {"firecracker_version": FIRECRACKER_API_VERSION}
        machine = (await http(path, "GET", "/machine-config")).body
        assert (machine["vcpu_count"], machine["mem_size_mib"]) == (1, 128)


async def test_put_machine_config_and_boot_source_before_start(sockdir: str) -> None:
    path = os.path.join(sockdir, "fc.sock")
    async with serving_slot(path):
        client = await HttpClient.connect(path)  # one keep-alive connection throughout
        try:
            put = await client.request("PUT", "/machine-config", {
                "vcpu_count": 2, "mem_size_mib": 64, "smt": False, "track_dirty_pages": True,
            })  # fmt: skip
            assert (put.status, put.body) == (204, None)
            machine = (await client.request("GET", "/machine-config")).body
            _schemas.check(_schemas.MACHINE_CONFIGURATION, machine)
            assert (machine["vcpu_count"], machine["mem_size_mib"]) == (2, 64)
            assert machine["track_dirty_pages"] is True
            boot = await client.request("PUT", "/boot-source", {
                "kernel_image_path": "builtin:memwriter", "boot_args": "working_set_mib=4",
            })  # fmt: skip
            assert boot.status == 204
            config = (await client.request("GET", "/vm/config")).body
            _schemas.check(_schemas.FULL_VM_CONFIGURATION, config)
            assert config["boot-source"] == {
                "kernel_image_path": "builtin:memwriter", "boot_args": "working_set_mib=4",
            }
            assert config["machine-config"] == machine
        finally:
            await client.aclose()


@pytest.mark.parametrize(
    ("method", "target", "body", "needle"),
    [
        ("GET", "/nope", None, "Invalid request method and/or path: GET /nope."),
        ("DELETE", "/vm", None, "Invalid request method and/or path: DELETE /vm."),
        ("PUT", "/drives/rootfs", {"drive_id": "rootfs"}, "does not serve PUT /drives/rootfs"),
        ("PUT", "/boot-source", {"kernel_image_path": "/boot/vmlinux"},
         "built-in guest programs only, not kernel images"),
        ("PUT", "/boot-source", {"kernel_image_path": "builtin:counter", "initrd_path": "/i"},
         "initrd_path"),
        ("PUT", "/boot-source", {"kernel_image_path": "builtin:memwriter", "boot_args": "quiet"},
         "'quiet' is not NAME=INTEGER"),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "bogus": 1},
         "bogus: unknown field"),
        ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 64}, "vcpu_count"),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "smt": True}, "smt"),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"},
         "huge_pages"),
        ("PUT", "/machine-config", {"mem_size_mib": 64}, "vcpu_count: required field missing"),
        ("PUT", "/actions", {"action_type": "InstanceStart"}, "without a boot source"),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, "SendCtrlAltDel"),
        ("PUT", "/actions", {"action_type": "Reboot"}, "action_type"),
        ("PATCH", "/vm", {"state": "Paused"}, "the microVM is not started"),
        ("PATCH", "/vm", {"state": "Frozen"}, "state"),
        ("PUT", "/snapshot/create", {"snapshot_path": "/tmp/a.snap", "mem_file_path": "/tmp/a.mem"},
         "Firecracker requires a Paused microVM"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/a.snap", "mem_file_path": "/tmp/a.mem",
                                   "network_overrides": [{"iface_id": "eth0",
                                                          "host_dev_name": "tap0"}]},
         "no network interfaces"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/a.snap", "mem_file_path": "/tmp/a.mem",
                                   "vsock_override": {"uds_path": "/tmp/v.sock"}},
         "no vsock device"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/a.snap", "mem_file_path": "/tmp/a.mem",
                                   "clock_realtime": True}, "clock_realtime"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/a.snap", "mem_file_path": "/tmp/a.mem",
                                   "version": "1.0.0"}, "version: unknown field"),
        ("PUT", "/snapshot/load", {"snapshot_path": "/tmp/a.snap"},
         "exactly one of mem_backend and mem_file_path"),
    ],
)  # fmt: skip
async def test_refusals_answer_400_with_a_fault_message(
    sockdir: str, method: str, target: str, body: Any, needle: str
) -> None:
    path = os.path.join(sockdir, "fc.sock")
    async with serving_slot(path):
        assert needle in _fault(await http(path, method, target, body))
        # Nothing was half-done: the slot is still empty and at its defaults.
        assert (await http(path, "GET", "/")).body["state"] == "Not started"
        machine = (await http(path, "GET", "/machine-config")).body
        assert (machine["vcpu_count"], machine["mem_size_mib"]) == (1, 128)


async def test_load_of_a_missing_snapshot_is_a_400_naming_the_file(sockdir: str) -> None:
    path = os.path.join(sockdir, "fc.sock")
    missing = os.path.join(sockdir, "missing.snap")
    async with serving_slot(path):
        message = _fault(await http(path, "PUT", "/snapshot/load", {
            "snapshot_path": missing, "mem_backend": {"backend_type": "File",
                                                      "backend_path": missing + ".mem"},
            "enable_diff_snapshots": True, "clock_realtime": False, "network_overrides": [],
        }))  # fmt: skip
        assert "snapshot I/O error" in message or "No such file" in message


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"", "the body is empty"),
        (b"{not json", "deserializing the json body"),
        (b"[1, 2]", "expected a JSON object"),
    ],
)
async def test_bad_bodies_are_refused(sockdir: str, raw: bytes, needle: str) -> None:
    path = os.path.join(sockdir, "fc.sock")
    async with serving_slot(path):
        assert needle in _fault(await http(path, "PUT", "/machine-config", raw=raw))


async def test_oversized_body_is_refused_and_the_socket_keeps_serving(sockdir: str) -> None:
    path = os.path.join(sockdir, "fc.sock")
    async with serving_slot(path):
        raw = b'{"x": "' + b"a" * (4 * MAX_PAYLOAD_BYTES) + b'"}'
        answer = await http(path, "PUT", "/machine-config", raw=raw)
        assert "larger than the limit" in _fault(answer)
        assert answer.headers.get("connection") == "close"
        assert (await http(path, "GET", "/")).status == 200


async def test_a_garbage_request_line_gets_400_and_the_next_client_is_served(
    sockdir: str,
) -> None:
    import trio

    path = os.path.join(sockdir, "fc.sock")
    async with serving_slot(path):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            reply = b""
            while chunk := await stream.receive_some(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 400 ")
        assert b"fault_message" in reply
        assert (await http(path, "GET", "/version")).status == 200


async def test_peer_outside_the_allow_list_gets_403(sockdir: str) -> None:
    path = os.path.join(sockdir, "fc.sock")
    other_uid = 4242 if os.getuid() != 4242 else 4243
    async with serving_slot(path, allowed_uids={other_uid}):
        answer = await http(path, "GET", "/")
        assert answer.status == 403
        _schemas.check(_schemas.ERROR, answer.body)
        assert f"uid {os.getuid()} is not allowed" in answer.body["fault_message"]


async def test_fake_route_bug_answers_500_and_the_socket_keeps_serving(
    sockdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from squibd.api import firecracker

    async def broken(app: Any, body: bytes) -> Any:
        raise RuntimeError("injected bug")

    monkeypatch.setitem(firecracker._ROUTES, ("GET", "/version"), broken)
    path = os.path.join(sockdir, "fc.sock")
    async with serving_slot(path):
        client = await HttpClient.connect(path)
        try:
            message = _fault(await client.request("GET", "/version"), status=500)
            assert "incident" in message  # the log has the traceback; the wire names no class
            assert "RuntimeError" not in message
            assert (await client.request("GET", "/")).status == 200  # same connection
        finally:
            await client.aclose()


def test_api_socket_is_0600_without_touching_the_umask(sockdir: str) -> None:
    from squibd.server import bind_api_socket

    path = os.path.join(sockdir, "m.sock")
    old = os.umask(0)  # the widest umask: the socket must still come out 0600
    try:
        sock = bind_api_socket(path)
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        finally:
            sock.close()
    finally:
        assert os.umask(old) == 0  # bind_api_socket left the process umask alone
