"""JSON-RPC 2.0 messages as small frozen events, and their parsing.

Every event validates itself on construction, so an event that exists is a
valid message. :func:`parse_message` turns one decoded JSON value into an
event; anything malformed becomes :class:`Invalid`, which carries the error
to answer (and the id to answer it with, when one could be recovered).
"""

from __future__ import annotations

import json
from typing import Any, Final, TypeAlias

import attrs

from ._errors import INVALID_REQUEST, PARSE_ERROR, ErrorObject

__all__ = [
    "JSONRPC_VERSION",
    "Batch",
    "ErrorResponse",
    "Event",
    "Invalid",
    "Message",
    "Notification",
    "Request",
    "RequestId",
    "Response",
    "encode",
    "parse_line",
    "parse_message",
]

#: The "jsonrpc" member every message carries (JSON-RPC 2.0 section 4).
JSONRPC_VERSION: Final = "2.0"

RequestId: TypeAlias = "int | str"
Params: TypeAlias = "dict[str, Any] | list[Any] | None"


def _check_id(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"request id must be a string or an integer, got {value!r}")


def _check_params(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, dict | list):
        raise ValueError("params must be an object or an array")


def _check_method(instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError("method must be a non-empty string")


@attrs.frozen
class Request:
    """A call that expects a response."""

    id: RequestId = attrs.field(validator=_check_id)
    method: str = attrs.field(validator=_check_method)
    params: Params = attrs.field(default=None, validator=_check_params)

    def to_json(self) -> dict[str, Any]:
        """The message as a JSON-ready dict."""
        out: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "id": self.id, "method": self.method}
        if self.params is not None:
            out["params"] = self.params
        return out


@attrs.frozen
class Notification:
    """A call without an id: never answered."""

    method: str = attrs.field(validator=_check_method)
    params: Params = attrs.field(default=None, validator=_check_params)

    def to_json(self) -> dict[str, Any]:
        """The message as a JSON-ready dict."""
        out: dict[str, Any] = {"jsonrpc": JSONRPC_VERSION, "method": self.method}
        if self.params is not None:
            out["params"] = self.params
        return out


@attrs.frozen
class Response:
    """A successful answer to the request with the same id."""

    id: RequestId = attrs.field(validator=_check_id)
    result: Any = None

    def to_json(self) -> dict[str, Any]:
        """The message as a JSON-ready dict."""
        return {"jsonrpc": JSONRPC_VERSION, "id": self.id, "result": self.result}


@attrs.frozen
class ErrorResponse:
    """A failed answer; ``id`` is ``None`` when the request's id was unreadable."""

    id: RequestId | None = attrs.field(validator=attrs.validators.optional(_check_id))
    error: ErrorObject = attrs.field(validator=attrs.validators.instance_of(ErrorObject))

    def to_json(self) -> dict[str, Any]:
        """The message as a JSON-ready dict."""
        return {"jsonrpc": JSONRPC_VERSION, "id": self.id, "error": self.error.to_json()}


@attrs.frozen
class Invalid:
    """Something the peer sent that must be answered with ``error``."""

    id: RequestId | None
    error: ErrorObject


Message: TypeAlias = Request | Notification | Response | ErrorResponse | Invalid


@attrs.frozen
class Batch:
    """A JSON array of messages (JSON-RPC 2.0 section 6); never empty."""

    items: tuple[Message, ...] = attrs.field(validator=attrs.validators.min_len(1))


Event: TypeAlias = Message | Batch


def _invalid(detail: str, request_id: RequestId | None = None) -> Invalid:
    return Invalid(request_id, ErrorObject(INVALID_REQUEST, f"Invalid Request: {detail}"))


def _recover_id(value: dict[str, Any]) -> RequestId | None:
    raw = value.get("id")
    if isinstance(raw, int | str) and not isinstance(raw, bool):
        return raw
    return None


def parse_message(value: Any) -> Message:
    """Turn one decoded JSON value (not an array) into a message event."""
    if not isinstance(value, dict):
        return _invalid("a message must be a JSON object")
    request_id = _recover_id(value)
    if value.get("jsonrpc") != JSONRPC_VERSION:
        return _invalid('"jsonrpc" must be "2.0"', request_id)
    try:
        if "method" in value:
            extra = set(value) - {"jsonrpc", "id", "method", "params"}
            if extra:
                return _invalid(f"unknown members {sorted(extra)}", request_id)
            if "id" in value:
                return Request(value["id"], value["method"], value.get("params"))
            return Notification(value["method"], value.get("params"))
        if "result" in value and "error" not in value:
            return Response(value["id"], value["result"])
        if "error" in value and "result" not in value:
            error = value["error"]
            if not isinstance(error, dict):
                return _invalid('"error" must be an object', request_id)
            obj = ErrorObject(error["code"], error["message"], error.get("data"))
            return ErrorResponse(value.get("id"), obj)
    except (ValueError, TypeError) as exc:
        return _invalid(str(exc), request_id)
    except KeyError as exc:
        return _invalid(f"missing member {exc}", request_id)
    return _invalid('a message needs "method", "result" or "error"', request_id)


def parse_line(line: bytes) -> Event:
    """Decode one framed line (UTF-8 JSON) into an event.

    Undecodable bytes or JSON give an :class:`Invalid` with -32700; an
    empty array gives -32600, as the specification requires.
    """
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Invalid(None, ErrorObject(PARSE_ERROR, f"Parse error: {exc}"))
    if isinstance(value, list):
        if not value:
            return _invalid("empty batch")
        return Batch(tuple(parse_message(item) for item in value))
    return parse_message(value)


def encode(payload: Any) -> bytes:
    """Encode a JSON-ready value as one compact line ending in ``\\n``."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\n"
