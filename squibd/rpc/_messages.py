"""JSON-RPC 2.0 messages as small frozen events, and their parsing.

Every event validates itself on construction, so an event that exists is a
valid message. :func:`parse_message` turns one decoded JSON value into an
event; anything malformed becomes :class:`Invalid`, which carries the error
to answer (and the id to answer it with, when one could be recovered).
"""

from __future__ import annotations

import json
import math
import operator
import re
from itertools import accumulate, repeat
from typing import Any, Final, TypeAlias

import attrs

from ._errors import INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, ErrorObject

__all__ = [
    "JSONRPC_VERSION",
    "MAX_BATCH",
    "MAX_NESTING",
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

#: The deepest nesting of arrays and objects a line may hold (the batch array counts).
#: squibd's deepest params are three levels deep; a bound keeps every recursive
#: consumer (the JSON decoder, the params converter, logging) far from Python's
#: recursion limit.
MAX_NESTING: Final = 64
#: The most messages one batch may hold: each costs work on the daemon's event
#: loop, so a line of a million ``1,`` must not become a million answers.
MAX_BATCH: Final = 1024

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


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a decoded JSON value holds a string UTF-8 cannot encode (iteratively)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _LONE_SURROGATE.search(item) is not None:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _surrogate_error(value: dict[str, Any], request_id: RequestId | None) -> Invalid | None:
    if isinstance(request_id, str) and _has_lone_surrogate(request_id):
        return _invalid(f"id: {_SURROGATE_DETAIL}")
    others = {key: member for key, member in value.items() if key != "params"}
    if _has_lone_surrogate(others):
        return _invalid(_SURROGATE_DETAIL, request_id)
    if "params" in value and _has_lone_surrogate(value["params"]):
        return Invalid(
            request_id, ErrorObject(INVALID_PARAMS, f"Invalid params: {_SURROGATE_DETAIL}")
        )
    return None


_LONE_SURROGATE: Final = re.compile("[\ud800-\udfff]")
_SURROGATE_DETAIL: Final = (
    "a string holds a lone UTF-16 surrogate (such as \\ud800), which UTF-8 cannot carry"
)


def parse_message(value: Any, *, check_surrogates: bool = True) -> Message:
    """Turn one decoded JSON value (not an array) into a message event.

    A lone surrogate in the id, the method or any other member is -32600, in
    ``params`` -32602 (the answer must be encodable as UTF-8); pass
    ``check_surrogates=False`` when the text is known to hold none.
    """
    if not isinstance(value, dict):
        return _invalid("a message must be a JSON object")
    request_id = _recover_id(value)
    if check_surrogates:
        surrogate = _surrogate_error(value, request_id)
        if surrogate is not None:
            return surrogate
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


def _nesting_depth(line: bytes) -> int:
    """The deepest ``[``/``{`` nesting of a JSON text, ignoring brackets inside strings.

    Runs in C: strings are cut out, brackets mapped to +1/-1 and summed.
    """
    if line.count(b"[") + line.count(b"{") <= MAX_NESTING:
        return 0  # cannot be deeper than the bound: skip the scan
    brackets = _JSON_STRING.sub(b"", line).translate(_BRACKET_TABLE, _NOT_BRACKET)
    return max(accumulate(map(operator.sub, brackets, repeat(1))), default=0)


# A JSON string (unterminated ones are left alone: the decoder refuses them).
_JSON_STRING: Final = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
# '[' and '{' become 2, ']' and '}' become 0 (so byte - 1 is +1/-1); the rest is deleted.
_BRACKET_TABLE: Final = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")
_NOT_BRACKET: Final = bytes(b for b in range(256) if b not in b"[{]}")


# A \\u escape of a UTF-16 surrogate (d800-dfff); valid UTF-8 input carries none otherwise.
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"the number {text[:32]} is out of range")
    return number


def parse_line(line: bytes) -> Event:
    """Decode one framed line (UTF-8 JSON) into an event.

    Undecodable bytes or JSON (also ``NaN``, ``Infinity`` and numbers beyond
    a double's range) give an :class:`Invalid` with -32700; an empty array,
    a batch of more than :data:`MAX_BATCH` messages or nesting deeper than
    :data:`MAX_NESTING` gives -32600. Never raises.
    """
    depth = _nesting_depth(line)
    if depth > MAX_NESTING:
        return _invalid(f"arrays and objects nest {depth} deep, more than {MAX_NESTING}")
    try:
        value = json.loads(
            line.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError) as exc:
        return Invalid(None, ErrorObject(PARSE_ERROR, f"Parse error: {exc}"))
    except RecursionError:  # unreachable with the depth bound; kept as a last line of defence
        return _invalid(f"arrays and objects nest more than {MAX_NESTING} deep")
    check = _SURROGATE_ESCAPE.search(line) is not None  # else no string can hold one
    if isinstance(value, list):
        if not value:
            return _invalid("empty batch")
        if len(value) > MAX_BATCH:
            return _invalid(f"a batch holds {len(value)} messages, more than {MAX_BATCH}")
        return Batch(tuple(parse_message(item, check_surrogates=check) for item in value))
    return parse_message(value, check_surrogates=check)


def encode(payload: Any) -> bytes:
    """Encode a JSON-ready value as one compact line ending in ``\\n``."""
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8") + b"\n"
