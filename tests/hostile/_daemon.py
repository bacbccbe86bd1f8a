"""A real squibd subprocess for the hostile suites, and raw socket helpers."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from typing import Any

from tests.server.helpers import blocking_call, start_daemon

__all__ = ["Daemon", "exchange", "rss_bytes"]


class Daemon:
    """A squibd subprocess on ``path``; :meth:`check_alive` after each hostile case."""

    def __init__(self, directory: str, *args: str) -> None:
        self.proc, self.path = start_daemon(directory, *args)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        """The daemon runs and answers a well-behaved client's daemon.status."""
        assert self.proc.poll() is None, f"squibd exited with {self.proc.returncode}"
        answer = blocking_call(self.path, "daemon.status", timeout=60)
        assert answer["result"]["pid"] == self.proc.pid

    def stop(self) -> int:
        """SIGTERM; returns the exit status (0: it stopped gracefully)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def exchange(path: str, data: bytes, *, chunks: list[int] | None = None) -> list[Any]:
    """Send ``data`` (split at ``chunks`` sizes, if given), half-close, read every answer line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(60)  # a hang guard, not a timing assertion
        s.connect(path)
        if chunks:
            offset = 0
            for size in chunks:
                if offset >= len(data):
                    break
                s.sendall(data[offset : offset + size])
                offset += size
            s.sendall(data[offset:])
        else:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(1 << 16):
            received += chunk
    assert received == b"" or received.endswith(b"\n"), received[-200:]
    return [json.loads(line) for line in received.splitlines()]


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")
