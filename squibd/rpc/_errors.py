"""JSON-RPC error codes and the error object.

The standard codes come from the JSON-RPC 2.0 specification (section 5.1);
the application codes -32001..-32005 are squibd's (SPEC section 9, issue 5);
-32800 "request cancelled" is borrowed from the Language Server Protocol,
which uses it for the same purpose (``$/cancelRequest``).
"""

from __future__ import annotations

from typing import Any, Final

import attrs

__all__ = [
    "BUSY",
    "CANCELLED",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "NOT_ALLOWED",
    "PARSE_ERROR",
    "SNAPSHOT_ERROR",
    "UNKNOWN_VM",
    "WRONG_VM_STATE",
    "ErrorObject",
    "LocalProtocolError",
    "RemoteProtocolError",
    "RpcError",
    "application_error",
]

# JSON-RPC 2.0 specification, section 5.1.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
# squibd application errors (issue 5).
SNAPSHOT_ERROR: Final = -32001
UNKNOWN_VM: Final = -32002
WRONG_VM_STATE: Final = -32003
BUSY: Final = -32004
NOT_ALLOWED: Final = -32005
# Language Server Protocol's RequestCancelled.
CANCELLED: Final = -32800

_STANDARD_MESSAGES: Final = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid Request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
}


def _check_code(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"error code must be an integer, got {value!r}")


@attrs.frozen
class ErrorObject:
    """A JSON-RPC error object: ``{"code", "message", "data"?}``."""

    code: int = attrs.field(validator=_check_code)
    message: str = attrs.field(validator=attrs.validators.instance_of(str))
    data: Any = None

    def to_json(self) -> dict[str, Any]:
        """The error as a JSON-ready dict (``data`` omitted when ``None``)."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out

    @property
    def kind(self) -> str | None:
        """``data.kind`` of an application error, if any."""
        if isinstance(self.data, dict):
            kind = self.data.get("kind")
            return kind if isinstance(kind, str) else None
        return None

    @property
    def fault_message(self) -> str:
        """``data.fault_message`` when present, else ``message``."""
        if isinstance(self.data, dict):
            fault = self.data.get("fault_message")
            if isinstance(fault, str):
                return fault
        return self.message


class RpcError(Exception):
    """An error to be answered to the peer as a JSON-RPC error object.

    Handlers raise it (or have it raised for them by the error mapping);
    ``error`` is what goes on the wire.
    """

    def __init__(self, code: int, message: str | None = None, data: Any = None) -> None:
        text = message if message is not None else _STANDARD_MESSAGES.get(code, "Server error")
        self.error = ErrorObject(code, text, data)
        super().__init__(text)

    @classmethod
    def invalid_params(cls, detail: str) -> RpcError:
        """-32602 with a message naming the offending field path."""
        return cls(INVALID_PARAMS, f"Invalid params: {detail}")


def application_error(code: int, kind: str, fault_message: str) -> RpcError:
    """An application error carrying ``data: {"kind", "fault_message"}`` (SPEC section 9)."""
    return RpcError(code, fault_message, {"kind": kind, "fault_message": fault_message})


class LocalProtocolError(Exception):
    """We were asked to send something the protocol forbids (a bug on our side)."""


class RemoteProtocolError(Exception):
    """The peer sent something the protocol forbids (for the client side)."""
