"""The sans-IO connection: parsing, error codes, batches, id bookkeeping."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.rpc import (
    INVALID_REQUEST,
    NEED_DATA,
    PARSE_ERROR,
    Batch,
    ErrorObject,
    ErrorResponse,
    Invalid,
    LocalProtocolError,
    Notification,
    RemoteProtocolError,
    Request,
    Response,
    Role,
    RpcConnection,
    application_error,
)


def _server_event(line: bytes) -> Any:
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(line + b"\n")
    return conn.next_event()


def test_request_and_notification_are_parsed() -> None:
    event = _server_event(b'{"jsonrpc":"2.0","id":7,"method":"daemon.status","params":{}}')
    assert event == Request(7, "daemon.status", {})
    event = _server_event(b'{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":7}}')
    assert event == Notification("$/cancelRequest", {"id": 7})


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", PARSE_ERROR),
        (b"\xff\xfe", PARSE_ERROR),
        (b"[]", INVALID_REQUEST),
        (b"42", INVALID_REQUEST),
        (b'{"jsonrpc":"1.0","id":1,"method":"x"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1.5,"method":"x"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":true,"method":"x"}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"method":""}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","params":3}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"method":"x","extra":3}', INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","id":1,"result":3}', INVALID_REQUEST),
    ],
)
def test_malformed_messages_become_invalid_with_the_right_code(line: bytes, code: int) -> None:
    event = _server_event(line)
    assert isinstance(event, Invalid)
    assert event.error.code == code


def test_invalid_request_keeps_a_readable_id() -> None:
    event = _server_event(b'{"jsonrpc":"1.0","id":"abc","method":"x"}')
    assert isinstance(event, Invalid)
    assert event.id == "abc"


def test_batch_items_are_parsed_individually() -> None:
    event = _server_event(
        b'[{"jsonrpc":"2.0","id":1,"method":"a"},1,{"jsonrpc":"2.0","method":"b"}]'
    )
    assert isinstance(event, Batch)
    assert event.items[0] == Request(1, "a")
    assert isinstance(event.items[1], Invalid)
    assert event.items[2] == Notification("b")


def test_oversize_line_then_valid_request_on_same_connection() -> None:
    conn = RpcConnection(Role.SERVER, max_line=48)
    conn.receive_data(b'{"jsonrpc":"2.0","id":1,"method":"' + b"x" * 64 + b'"}\n')
    conn.receive_data(b'{"jsonrpc":"2.0","id":2,"method":"m"}\n')
    first = conn.next_event()
    assert isinstance(first, Invalid)
    assert first.error.code == INVALID_REQUEST
    assert first.error.data == {"limit": 48}
    assert conn.next_event() == Request(2, "m")
    assert conn.next_event() is NEED_DATA


def test_duplicate_in_flight_id_is_refused_and_id_is_reusable_after_answer() -> None:
    conn = RpcConnection(Role.SERVER)
    line = b'{"jsonrpc":"2.0","id":5,"method":"m"}\n'
    conn.receive_data(line * 2)
    assert conn.next_event() == Request(5, "m")
    dup = conn.next_event()
    assert isinstance(dup, Invalid)
    assert dup.id is None
    out = conn.send_response(Response(5, {"ok": True}))
    assert json.loads(out) == {"jsonrpc": "2.0", "id": 5, "result": {"ok": True}}
    conn.receive_data(line)
    assert conn.next_event() == Request(5, "m")


def test_answering_an_unknown_id_is_a_local_error() -> None:
    conn = RpcConnection(Role.SERVER)
    with pytest.raises(LocalProtocolError):
        conn.send_response(Response(99, None))


def test_batch_response_is_one_array_line() -> None:
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(
        b'[{"jsonrpc":"2.0","id":1,"method":"a"},{"jsonrpc":"2.0","id":2,"method":"b"}]\n'
    )
    assert isinstance(conn.next_event(), Batch)
    err = application_error(-32002, "UnknownVm", "no VM named 'x'")
    out = conn.send_batch([Response(1, 1), ErrorResponse(2, err.error)])
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    decoded = json.loads(out)
    assert [item["id"] for item in decoded] == [1, 2]
    assert decoded[1]["error"]["data"] == {"kind": "UnknownVm", "fault_message": "no VM named 'x'"}
    assert conn.send_batch([]) == b""


def test_client_matches_responses_to_its_requests() -> None:
    client = RpcConnection(Role.CLIENT)
    request_id, data = client.send_request("daemon.status", {})
    assert json.loads(data)["id"] == request_id
    client.receive_data(
        json.dumps({"jsonrpc": "2.0", "id": request_id, "result": 1}).encode() + b"\n"
    )
    assert client.next_event() == Response(request_id, 1)
    assert client.in_flight == frozenset()
    client.receive_data(b'{"jsonrpc":"2.0","id":12345,"result":1}\n')
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_client_parses_error_responses() -> None:
    client = RpcConnection(Role.CLIENT)
    request_id, _ = client.send_request("x")
    client.receive_data(
        json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "error": {"code": -32601, "message": "nope"}}
        ).encode()
        + b"\n"
    )
    assert client.next_event() == ErrorResponse(request_id, ErrorObject(-32601, "nope"))


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode()))
def test_parser_never_raises_on_arbitrary_input(line: bytes) -> None:
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(line.replace(b"\n", b" ") + b"\n")
    conn.next_event()


@settings(max_examples=100, deadline=None)
@given(st.integers() | st.text(min_size=1, max_size=8), _JSON.filter(lambda v: isinstance(v, dict)))
def test_request_round_trips(request_id: int | str, params: dict[str, Any]) -> None:
    request = Request(request_id, "m.x", params)
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(json.dumps(request.to_json()).encode() + b"\n")
    assert conn.next_event() == request


def test_invalid_request_with_an_id_can_be_answered_with_that_id() -> None:
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(b'{"jsonrpc":"2.0","id":4}\n')
    event = conn.next_event()
    assert isinstance(event, Invalid) and event.id == 4
    out = conn.send_response(ErrorResponse(event.id, event.error))
    assert json.loads(out)["id"] == 4


def test_unencodable_result_leaves_the_id_in_flight() -> None:
    conn = RpcConnection(Role.SERVER)
    conn.receive_data(b'{"jsonrpc":"2.0","id":1,"method":"m"}\n')
    conn.next_event()
    with pytest.raises(ValueError):
        conn.send_response(Response(1, float("nan")))
    assert conn.in_flight == frozenset({1})
    assert json.loads(conn.send_response(ErrorResponse(1, ErrorObject(-32603, "x"))))["id"] == 1
