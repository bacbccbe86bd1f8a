"""Issue 10: lines that crashed the daemon become typed answers (sans-IO level)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from squibd.rpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_BATCH,
    MAX_NESTING,
    NEED_DATA,
    PARSE_ERROR,
    Batch,
    ErrorResponse,
    Invalid,
    Request,
    Role,
    RpcConnection,
    Signal,
    encode,
)


def _events(data: bytes) -> list[Any]:
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(data)
    out: list[Any] = []
    while not isinstance(event := conn.next_event(), Signal):
        out.append(event)
    assert event is NEED_DATA
    return out


def _only(data: bytes) -> Any:
    (event,) = _events(data)
    return event


@pytest.mark.parametrize("opener", [b"[", b"{", b'{"a":', b'[{"a":'])
def test_deep_nesting_is_invalid_request_not_a_recursion_error(opener: bytes) -> None:
    event = _only(opener * 100_000 + b"\n")
    assert isinstance(event, Invalid) and event.error.code == INVALID_REQUEST
    assert "nest" in event.error.message


def test_nesting_up_to_the_bound_is_parsed_and_brackets_in_strings_do_not_count() -> None:
    deep = b"[" * (MAX_NESTING - 2) + b"1" + b"]" * (MAX_NESTING - 2)  # + message + params
    line = b'{"jsonrpc":"2.0","id":1,"method":"x","params":{"a":' + deep + b"}}\n"
    assert isinstance(_only(line), Request)
    brackets = json.dumps("[{" * 10_000).encode()
    line = b'{"jsonrpc":"2.0","id":2,"method":"x","params":{"a":' + brackets + b"}}\n"
    assert isinstance(_only(line), Request)


def test_a_hundred_thousand_blank_lines_in_one_read_are_skipped() -> None:
    line = b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n'
    assert _events(b"\n" * 100_000 + b"  \r\n" * 1000 + line) == [Request(1, "daemon.status")]


@pytest.mark.parametrize(
    ("line", "code", "answer_id"),
    [
        (b'{"jsonrpc":"2.0","id":"\\ud800","method":"daemon.status"}', INVALID_REQUEST, None),
        (b'{"jsonrpc":"2.0","id":1,"method":"\\udfff"}', INVALID_REQUEST, 1),
        (b'{"jsonrpc":"2.0","id":2,"method":"vm.list","params":{"\\ud800":1}}', INVALID_PARAMS, 2),
        (b'{"jsonrpc":"2.0","id":3,"method":"snapshot.create","params":'
         b'{"progress_token":"x\\udc00"}}', INVALID_PARAMS, 3),
        (b'{"jsonrpc":"2.0","id":4,"method":"x","params":[["\\ud83d"]]}', INVALID_PARAMS, 4),
        (b'{"jsonrpc":"2.0","id":5,"method":"x","\\ud800":1}', INVALID_REQUEST, 5),
    ],
)  # fmt: skip
def test_lone_surrogates_are_refused_and_the_answer_is_encodable(
    line: bytes, code: int, answer_id: Any
) -> None:
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(line + b"\n")
    event = conn.next_event()
    assert isinstance(event, Invalid) and event.error.code == code
    assert event.id == answer_id
    data = conn.send_response(ErrorResponse(event.id, event.error))
    assert json.loads(data)["error"]["code"] == code  # UTF-8, no exception


def test_a_surrogate_pair_is_one_character_and_accepted() -> None:
    event = _only(b'{"jsonrpc":"2.0","id":"\\ud83d\\ude00","method":"x"}\n')
    assert event == Request("\U0001f600", "x")


@pytest.mark.parametrize("text", [b"[NaN]", b"[Infinity]", b"[-Infinity]", b"[1e400]",
                                  b"[" + b"9" * 5000 + b"]"])  # fmt: skip
def test_non_finite_and_huge_numbers_are_parse_errors(text: bytes) -> None:
    event = _only(text + b"\n")
    assert isinstance(event, Invalid) and event.error.code == PARSE_ERROR
    encode(ErrorResponse(None, event.error).to_json())


def test_a_batch_above_the_bound_is_one_invalid_request() -> None:
    batch = json.dumps([{"jsonrpc": "2.0", "method": "x"}] * (MAX_BATCH + 1)).encode()
    event = _only(batch + b"\n")
    assert isinstance(event, Invalid) and event.error.code == INVALID_REQUEST
    assert str(MAX_BATCH) in event.error.message
    batch = json.dumps([{"jsonrpc": "2.0", "method": "x"}] * MAX_BATCH).encode()
    event = _only(batch + b"\n")
    assert isinstance(event, Batch) and len(event.items) == MAX_BATCH


def test_the_client_line_cap_holds_the_largest_answer() -> None:
    # vm.read_memory answers up to 1 MiB as base64 (about 1.4 MB on one line).
    client = RpcConnection(Role.CLIENT)
    request_id, _ = client.send_request("vm.read_memory", {})
    answer = encode({"jsonrpc": "2.0", "id": request_id,
                     "result": {"data_base64": "A" * (4 * (1 << 20) // 3 + 4)}})  # fmt: skip
    client.receive_data(answer)
    event = client.next_event()
    assert not isinstance(event, Invalid), event
