"""Generate the OpenRPC description of the API (``protocol/openrpc.json``) from the models.

The document is derived from :data:`~squibd.api.methods.METHODS` and the
attrs models: field types, defaults and the constraints declared with
:func:`~squibd.api.wire.wire_field`. ``scripts/gen_openrpc.py`` writes it;
a test fails when the committed file differs from :func:`build_document`.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Final, Literal, get_args, get_origin

import attrs

import squibd
from squibd.rpc import (
    BUSY,
    CANCELLED,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_BATCH,
    MAX_NESTING,
    METHOD_NOT_FOUND,
    NOT_ALLOWED,
    PARSE_ERROR,
    SNAPSHOT_ERROR,
    UNKNOWN_VM,
    WRONG_VM_STATE,
)

from .methods import METHODS, MethodSpec
from .models import GUEST_PARAMETERS, GuestParams

__all__ = ["OPENRPC_VERSION", "build_document", "render_document"]

#: The OpenRPC specification version the document follows.
OPENRPC_VERSION: Final = "1.3.2"

_ERRORS: Final = {
    PARSE_ERROR: ("ParseError", "the line is not UTF-8 JSON"),
    INVALID_REQUEST: ("InvalidRequest", "not a JSON-RPC 2.0 request, or a line over the cap"),
    METHOD_NOT_FOUND: ("MethodNotFound", "no such method"),
    INVALID_PARAMS: ("InvalidParams", "bad params; the message names the field path"),
    INTERNAL_ERROR: ("InternalError", "a bug in squibd"),
    SNAPSHOT_ERROR: ("SnapshotError", "a snapshot failure; data.kind is one of SPEC section 2"),
    UNKNOWN_VM: ("UnknownVm", "no VM with that vm_id"),
    WRONG_VM_STATE: ("WrongVmState", "the VM's state does not allow the operation"),
    BUSY: ("Busy", "another save or load of the VM is running, or the daemon is full"),
    NOT_ALLOWED: ("NotAllowed", "peer not allowed, or a debug method without --debug-api"),
    CANCELLED: ("Cancelled", "cancelled by $/cancelRequest; nothing was committed"),
}
_ALWAYS: Final = (INVALID_PARAMS, INTERNAL_ERROR)
_PRIMITIVES: Final = {int: "integer", float: "number", str: "string", bool: "boolean"}


class _Schemas:
    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def of(self, tp: Any) -> dict[str, Any]:
        if tp in _PRIMITIVES:
            return {"type": _PRIMITIVES[tp]}
        if tp is type(None):
            return {"type": "null"}
        if tp is dict or tp is typing.Any:
            return {"type": "object"}
        origin = get_origin(tp)
        if origin is Literal:
            values = list(get_args(tp))
            return {"type": _PRIMITIVES[type(values[0])], "enum": values}
        if origin in (typing.Union, types.UnionType):
            return {"oneOf": [self.of(arg) for arg in get_args(tp)]}
        if origin is list:
            return {"type": "array", "items": self.of(get_args(tp)[0])}
        if origin is dict:
            return {"type": "object", "additionalProperties": self.of(get_args(tp)[1])}
        if isinstance(tp, type) and attrs.has(tp):
            return self.ref(tp)
        raise TypeError(f"no schema for {tp!r}")

    def ref(self, cls: type) -> dict[str, Any]:
        name = cls.__name__
        if name not in self.components:
            self.components[name] = {}  # placeholder against recursion
            self.components[name] = self.object(cls)
        return {"$ref": f"#/components/schemas/{name}"}

    def object(self, cls: type) -> dict[str, Any]:
        if cls is GuestParams:
            return {
                "description": (cls.__doc__ or "").strip().splitlines()[0],
                "oneOf": [
                    {
                        "type": "object",
                        "properties": {
                            "program": {"const": program},
                            **{name: {"type": "integer", "minimum": 0} for name in names},
                        },
                        "required": ["program"],
                        "additionalProperties": False,
                    }
                    for program, names in GUEST_PARAMETERS.items()
                ],
            }
        properties = {name: self.field(cls, name) for name in _field_names(cls)}
        required = [f.name for f in attrs.fields(cls) if f.default is attrs.NOTHING]
        schema: dict[str, Any] = {
            "type": "object",
            "description": (cls.__doc__ or "").strip().splitlines()[0],
            "properties": properties,
            "additionalProperties": False,
        }
        if required:
            schema["required"] = required
        return schema

    def field(self, cls: type, name: str) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        attribute = attrs.fields_dict(cls)[name]
        schema = dict(self.of(hints[name]))
        wire = attribute.metadata.get("wire", {})
        for key, json_key in (("description", "description"), ("minimum", "minimum"),
                              ("maximum", "maximum"), ("pattern", "pattern"),
                              ("max_length", "maxLength")):  # fmt: skip
            if wire.get(key) not in (None, ""):
                schema[json_key] = wire[key]
        default = attribute.default
        if default is not attrs.NOTHING and not isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            schema["default"] = default
        return schema


def _field_names(cls: type) -> list[str]:
    return [f.name for f in attrs.fields(cls)]


def _error(code: int) -> dict[str, Any]:
    name, meaning = _ERRORS[code]
    return {"code": code, "message": name, "data": {"meaning": meaning}}


def _method(spec: MethodSpec, schemas: _Schemas) -> dict[str, Any]:
    params_schema = schemas.object(spec.params)
    required = set(params_schema.get("required", []))
    params = [
        {"name": name, "required": name in required, "schema": schema}
        for name, schema in params_schema["properties"].items()
    ]
    method: dict[str, Any] = {
        "name": spec.name,
        "summary": spec.summary,
        "paramStructure": "by-name",
        "params": params,
        "result": {"name": "result", "schema": schemas.of(spec.result)},
        "errors": [_error(code) for code in sorted({*spec.errors, *_ALWAYS}, reverse=True)],
    }
    tags = []
    if spec.long_running:
        tags.append({"name": "long-running", "description": "progress_token and $/cancelRequest"})
        method["errors"].append(_error(CANCELLED))
    if spec.debug_only:
        tags.append({"name": "debug", "description": "only with squibd --debug-api"})
    if tags:
        method["tags"] = tags
    return method


def build_document() -> dict[str, Any]:
    """The OpenRPC document of every method, as a JSON-ready dict."""
    schemas = _Schemas()
    methods = [_method(spec, schemas) for spec in METHODS.values()]
    return {
        "openrpc": OPENRPC_VERSION,
        "info": {
            "title": "squibd",
            "version": squibd.__version__,
            "description": (
                "JSON-RPC 2.0 over a Unix stream socket, one JSON text per line "
                "(UTF-8, newline-terminated, at most 1 MiB by default); batches of at most "
                f"{MAX_BATCH} messages allowed; arrays and objects nest at most {MAX_NESTING} "
                "deep; numbers are finite; strings hold no lone surrogate. "
                "Application errors carry data {kind, fault_message}."
            ),
        },
        "methods": methods,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "errors": {_ERRORS[code][0]: _error(code) for code in sorted(_ERRORS, reverse=True)},
        },
        "x-notifications": [
            {
                "name": "$/progress",
                "direction": "server-to-client",
                "summary": "progress of a long-running call that carried progress_token",
                "params": {
                    "token": "the call's progress_token",
                    "phase": "string",
                    "done": "integer",
                    "total": "integer",
                },
            },
            {
                "name": "$/cancelRequest",
                "direction": "client-to-server",
                "summary": "cancel a running snapshot.create/load/rebase; it rolls back "
                "and answers -32800",
                "params": {"id": "the id of the request to cancel"},
            },
        ],
    }


def render_document() -> str:
    """The document as the text committed in ``protocol/openrpc.json``."""
    import json

    return json.dumps(build_document(), indent=2) + "\n"
