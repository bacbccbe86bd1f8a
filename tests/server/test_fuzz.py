"""Fuzzing the live daemon's socket: any bytes get JSON-RPC answers, never a crash."""

from __future__ import annotations

import json
import signal
import socket
import tempfile
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .helpers import blocking_call, start_daemon

_VALID = b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}'
_PIECES = st.sampled_from([
    _VALID, b"{", b"}", b"[", b"]", b",", b'"jsonrpc":"2.0"', b'"id":', b"null", b"1",
    b'"method":"vm.list"', b'"params":{}', b"\xff", b" ", b"\n", b"\n\n",
])  # fmt: skip


@pytest.fixture(scope="module")
def live_daemon() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="sqd-", dir="/tmp") as directory:
        proc, path = start_daemon(directory, "--log-level", "error")
        try:
            yield path
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, "the daemon survived the fuzzing and stops cleanly"


def _exchange(path: str, data: bytes) -> list[bytes]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)  # a hang guard
        s.connect(path)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received.splitlines()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_PIECES | st.binary(max_size=16), max_size=30))
def test_any_byte_stream_gets_only_jsonrpc_answers(live_daemon: str, pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    for line in _exchange(live_daemon, data + b"\n"):
        answer = json.loads(line)
        for item in answer if isinstance(answer, list) else [answer]:
            assert item["jsonrpc"] == "2.0"
            assert ("result" in item) != ("error" in item)
    assert blocking_call(live_daemon, "daemon.status")["result"]["vm_count"] == 0
