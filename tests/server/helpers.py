"""Helpers to run a real squibd server in-process (trio) or as a subprocess."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from squibd.api import ApiContext
from squibd.config import DaemonConfig, ServerConfig, SnapshotConfig
from squibd.server import Server, bind_unix_socket

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@asynccontextmanager
async def running_server(
    path: str,
    *,
    debug_api: bool = False,
    allowed_roots: tuple[str, ...] | None = None,
    **server_options: Any,
) -> AsyncIterator[Server]:
    """A Server on ``path`` served in a nursery; stopped gracefully on exit."""
    server_config = ServerConfig(socket=path, debug_api=debug_api, **server_options)
    config = DaemonConfig(server=server_config, snapshot=SnapshotConfig())
    sock = bind_unix_socket(path, mode=server_config.socket_mode)
    api = ApiContext(debug_api=debug_api, allowed_roots=allowed_roots)
    server = Server(config, api, [sock], [path], handle_signals=False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            try:
                yield server
            finally:
                server.request_stop()
    finally:
        sock.close()


async def raw_exchange(path: str, data: bytes, *, lines: int) -> list[Any]:
    """Send ``data`` on a fresh connection and read ``lines`` decoded answer lines."""
    stream = await trio.open_unix_socket(path)
    async with stream:
        await stream.send_all(data)
        return await read_lines(stream, lines)


async def read_lines(stream: trio.SocketStream, count: int) -> list[Any]:
    """Read ``count`` JSON lines from ``stream``."""
    buffer = b""
    out: list[Any] = []
    while len(out) < count:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buffer += chunk
        while b"\n" in buffer and len(out) < count:
            line, buffer = buffer.split(b"\n", 1)
            out.append(json.loads(line))
    return out


def request(request_id: int | str, method: str, params: Any = None) -> bytes:
    """One request line."""
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode() + b"\n"


def daemon_command(*args: str) -> list[str]:
    """The command line that runs squibd from this checkout."""
    return [sys.executable, "-m", "squibd.cli.daemon", *args]


def blocking_call(path: str, method: str, params: Any = None, timeout: float = 10.0) -> Any:
    """A synchronous one-shot call (for subprocess tests)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request(1, method, params))
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def wait_for_socket(proc: subprocess.Popen[bytes], path: str) -> None:
    """Block until the daemon answers on ``path`` (it logs 'listening' first)."""
    assert proc.stderr is not None
    for raw in proc.stderr:
        if b"squibd listening" in raw:
            return
    raise AssertionError(f"daemon exited with {proc.wait()} before listening on {path}")



def start_daemon(directory: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start squibd on ``directory/s.sock``; return once it has sent sd_notify READY=1.

    Without ``--state-dir`` in ``args`` it gets ``directory/state`` (one daemon at a
    time may use a state dir, and tests run several at once).
    """
    if "--state-dir" not in args:
        args = (*args, "--state-dir", os.path.join(directory, "state"))
    path = os.path.join(directory, "s.sock")
    notify_path = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(60)  # a hang guard for a daemon that never gets ready
        proc = subprocess.Popen(
            daemon_command("--socket", path, *args),
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    return proc, path
