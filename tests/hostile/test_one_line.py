"""Issue 10, "crashes from one line": each of these lines used to exit the daemon.

A real squibd subprocess takes them one after the other; after each it must
still answer a well-behaved client, and it must stop gracefully at the end.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from ._daemon import Daemon, exchange


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="sqd-", dir="/tmp") as directory:
        d = Daemon(directory, "--log-level", "error")
        try:
            yield d
        finally:
            assert d.stop() == 0, "the daemon survived every line and stops cleanly"


def _status(request_id: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": request_id, "method": "daemon.status"}).encode()


@pytest.mark.parametrize("opener", [b"[", b"{", b'{"a":', b'{"jsonrpc":"2.0","id":1,"params":['])
def test_a_thousand_nested_brackets(daemon: Daemon, opener: bytes) -> None:
    answers = exchange(daemon.path, opener * 1000 + b"\n" + _status(2) + b"\n")
    assert answers[0]["error"]["code"] == -32600 and "nest" in answers[0]["error"]["message"]
    assert answers[1]["id"] == 2 and "result" in answers[1], "the connection stays usable"
    daemon.check_alive()


def test_a_hundred_thousand_blank_lines_in_one_read(daemon: Daemon) -> None:
    answers = exchange(daemon.path, b"\n" * 100_000 + _status(1) + b"\n")
    assert [a["id"] for a in answers] == [1]
    daemon.check_alive()


@pytest.mark.parametrize(
    ("line", "code", "answer_id"),
    [
        (b'{"jsonrpc":"2.0","id":"\\ud800","method":"daemon.status"}', -32600, None),
        (b'{"jsonrpc":"2.0","id":1,"method":"\\ud800"}', -32600, 1),
        (b'{"jsonrpc":"2.0","id":1,"method":"vm.list","params":{"\\ud800":1}}', -32602, 1),
        (b'{"jsonrpc":"2.0","id":1,"method":"snapshot.rebase","params":{"base_snapshot_path":'
         b'"/tmp/a","diff_snapshot_path":"/tmp/b","output_snapshot_path":"/tmp/c",'
         b'"progress_token":"\\udc80"}}', -32602, 1),
        (b'[{"jsonrpc":"2.0","id":"\\udfff","method":"vm.list"}]', -32600, None),
        (b'{"jsonrpc":"2.0","id":1,"method":"vm.describe","params":{"vm_id":"\\ud800"}}',
         -32602, 1),
    ],
)  # fmt: skip
def test_lone_surrogates(daemon: Daemon, line: bytes, code: int, answer_id: Any) -> None:
    answers = exchange(daemon.path, line + b"\n" + _status(9) + b"\n")
    items = [i for a in answers for i in (a if isinstance(a, list) else [a])]
    (status,) = [i for i in items if "result" in i]  # a batch's answer may come second
    (refused,) = [i for i in items if "error" in i]
    assert refused["error"]["code"] == code and refused["id"] == answer_id
    assert status["id"] == 9
    daemon.check_alive()


@pytest.mark.parametrize(
    "line",
    [
        b"[NaN]",
        b'{"jsonrpc":"2.0","id":1e999,"method":"daemon.status"}',
        b'{"jsonrpc":"2.0","id":' + b"9" * 4000 + b',"method":"daemon.status"}',
        b'{"jsonrpc":"2.0","id":' + b"9" * 5000 + b',"method":"daemon.status"}',
        b'{"jsonrpc":"2.0","id":"' + b"x" * 900_000 + b'","method":"daemon.status"}',
        b"[" + b'{"jsonrpc":"2.0","method":"vm.list"},' * 5000 + b"1]",
        b"[" + b"1," * 300_000 + b"1]",
        b"\xef\xbb\xbf" + _status(1),  # a UTF-8 BOM
        _status(1).decode().encode("utf-16"),
        b"\xc3\x28\xa0\xa1\xf0\x28\x8c\xbc",  # invalid UTF-8
        b"\x00" * 1000,
        b"\r" * 1000,
    ],
)
def test_odd_lines_get_answers_and_leave_the_daemon_up(daemon: Daemon, line: bytes) -> None:
    for answer in exchange(daemon.path, line + b"\n"):
        for item in answer if isinstance(answer, list) else [answer]:
            assert item["jsonrpc"] == "2.0" and ("result" in item) != ("error" in item)
            if "error" in item:
                assert item["error"]["code"] != -32603
    daemon.check_alive()
