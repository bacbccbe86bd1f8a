"""Badly behaved peers of the daemon, written with plain sockets (real peers, no mocks)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

import trio

from squibd.vm.models import GuestSpec
from squibd.vm.runtime import Runtime

#: Room for the handshake JSON of a few regions (Firecracker sends one message).
_HANDSHAKE_BYTES = 1 << 16


class StallingPageServer:
    """Accepts VMMs, takes their handshake and userfaultfd, and never serves a page.

    It does not answer the squibd ``ready`` line either (a Firecracker-style
    server), and it keeps every connection and userfaultfd open until closed.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.handshakes = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        self._kept: list[socket.socket] = []
        self._fds: list[int] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:  # closed
                return
            try:
                _msg, fds, _flags, _addr = socket.recv_fds(conn, _HANDSHAKE_BYTES, 4)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._kept.append(conn)
                self._fds.extend(fds)
                self.handshakes += 1

    def close(self) -> None:
        """Close the listener, every connection and every userfaultfd it holds."""
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            for conn in self._kept:
                conn.close()
            for fd in self._fds:
                os.close(fd)
            self._kept.clear()
            self._fds.clear()


def save_counter_pair(directory: Path, *, vcpus: int = 1, mem_mib: int = 32) -> tuple[str, str]:
    """Run a counter guest briefly and save it as a Full pair; return (state, memory) paths."""
    snap, mem = str(directory / "src.snap"), str(directory / "src.mem")

    async def save() -> None:
        rt = Runtime(quiesce_timeout_s=30.0)
        try:
            vm = await rt.create_vm("src", vcpus, mem_mib, False, GuestSpec("counter"))
            await rt.start("src")
            with trio.fail_after(60):
                await vm.wait_heartbeats(1)
            await rt.save("src", "Full", snap, mem, resume=False)
        finally:
            await rt.aclose()

    trio.run(save)
    return snap, mem
