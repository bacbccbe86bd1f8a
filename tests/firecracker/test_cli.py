"""``squibctl vm create --api-socket`` and ``squibd --firecracker-api-socket`` usage."""

from __future__ import annotations

import os
import subprocess

from squibd.cli.ctl import build_parser, request_of
from tests.server.helpers import daemon_command


def test_squibctl_vm_create_passes_api_socket_and_memory_layout(sockdir: str) -> None:
    args = build_parser().parse_args([
        "vm", "create", "a", "--mem-mib", "4096", "--api-socket", "rel/a.sock",
        "--memory-layout", "firecracker",
    ])  # fmt: skip
    method, params = request_of(args)
    assert method == "vm.create"
    assert params["api_socket"] == os.path.abspath("rel/a.sock")
    assert params["memory_layout"] == "firecracker"
    plain = request_of(build_parser().parse_args(["vm", "create", "b"]))[1]
    assert "api_socket" not in plain and "memory_layout" not in plain


def test_slot_mode_refuses_a_bad_id_and_a_bad_socket_path(sockdir: str) -> None:
    path = os.path.join(sockdir, "x.sock")
    bad_id = subprocess.run(daemon_command("--firecracker-api-socket", path, "--id", "a b"),
                            capture_output=True, timeout=60)  # fmt: skip
    assert bad_id.returncode == 2
    assert b"--id" in bad_id.stderr
    relative = subprocess.run(daemon_command("--firecracker-api-socket", "x.sock"),
                              capture_output=True, timeout=60)  # fmt: skip
    assert relative.returncode == 2
    assert b"--firecracker-api-socket" in relative.stderr
    occupied = os.path.join(sockdir, "file")
    with open(occupied, "w"):
        pass
    taken = subprocess.run(daemon_command("--firecracker-api-socket", occupied),
                           capture_output=True, timeout=60)  # fmt: skip
    assert taken.returncode == 1
    assert b"not a socket" in taken.stderr
    assert not os.path.exists(path)
