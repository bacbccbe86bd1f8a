"""Issue 10, wire mapping of OS limits: running out of fds is a typed error, never -32603.

A real daemon in a child with ``RLIMIT_NOFILE`` lowered creates VMs until the
kernel refuses an fd; that call is answered -32004 with a typed kind, and
the daemon goes on serving and stops cleanly.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess

import pytest

from tests.server.helpers import blocking_call, daemon_command

#: Enough for the daemon to start, too few for a handful of 4-vCPU VMs.
_NOFILE = 48


def _lower_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_NOFILE, _NOFILE))


@pytest.mark.kvm
def test_running_out_of_fds_is_a_typed_error(sockdir: str) -> None:
    path, notify_path = f"{sockdir}/s.sock", f"{sockdir}/notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(60)  # a hang guard for a daemon that never gets ready
        proc = subprocess.Popen(
            daemon_command("--socket", path, "--log-level", "warning"),
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
            preexec_fn=_lower_nofile,
        )
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
            error = None
            for i in range(_NOFILE):
                answer = blocking_call(path, "vm.create", {
                    "vm_id": f"v{i}", "vcpu_count": 4, "mem_size_mib": 2,
                    "guest": {"program": "counter"},
                }, timeout=60)  # fmt: skip
                if "error" in answer:
                    error = answer["error"]
                    break
            assert error is not None, f"{_NOFILE} fds held every VM"
            assert error["code"] == -32004, error
            assert error["data"]["kind"] and "Error:" not in error["message"]
            assert blocking_call(path, "daemon.status")["result"]["pid"] == proc.pid
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0
