"""``vm.describe`` shows the VM's ``memory_layout`` and its Firecracker ``api_socket``."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from squibd.client import Client
from tests.server.helpers import start_daemon

pytestmark = pytest.mark.kvm


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    proc, path = start_daemon(str(tmp_path))
    try:
        yield path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_describe_shows_memory_layout_and_api_socket(sock: str, tmp_path: Path) -> None:
    api = str(tmp_path / "fc.api")
    with Client(sock, timeout=60) as c:
        # The layouts differ above 3 GiB only (the memory is not touched: no cost).
        made = c.vm_create("fc", mem_size_mib=3200, api_socket=api, memory_layout="firecracker")
        assert (made["memory_layout"], made["api_socket"]) == ("firecracker", api)
        c.vm_create("plain", mem_size_mib=64)
        plain = c.vm_describe("plain")
        assert (plain["memory_layout"], plain["api_socket"]) == ("squibd", None)
        listed = {vm["vm_id"]: vm for vm in c.vm_list()["vms"]}
        assert listed["fc"]["api_socket"] == api and listed["fc"]["memory_layout"] == "firecracker"
        c.vm_destroy("fc")
        assert not os.path.exists(api)
        assert [vm["vm_id"] for vm in c.vm_list()["vms"]] == ["plain"]
