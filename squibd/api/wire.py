"""The wire converter: strict JSON <-> attrs models, with readable field paths.

One converter is built by :func:`make_wire_converter` (never the global
cattrs converter). It is strict at the edge, as Firecracker's API is:

* unknown keys are rejected (``forbid_extra_keys``);
* ``int``, ``float``, ``str`` and ``bool`` are not coerced: ``"5"`` is not
  an integer and ``1`` is not a boolean;
* ``Literal`` values must match exactly.

Failures are turned into one :class:`~squibd.rpc.RpcError` (-32602) whose
message names every offending field by its path, e.g.
``params.mem_backend.backend_type``. Range and pattern checks are declared
with :func:`wire_field`, which also feeds the OpenRPC schema.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
)

from squibd.rpc import RpcError

__all__ = [
    "FieldValueError",
    "WireTypeError",
    "make_wire_converter",
    "structure_params",
    "unstructure_result",
    "wire_field",
]

T = TypeVar("T")

_NO_DEFAULT: Any = attrs.NOTHING


class WireTypeError(TypeError):
    """A JSON value has the wrong type for its field."""


class FieldValueError(ValueError):
    """A field's value is out of its declared range or pattern.

    ``name`` is the attribute; the path is completed by :func:`structure_params`.
    """

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(reason)
        self.name = name
        self.reason = reason


def _make_validator(
    minimum: int | None, maximum: int | None, pattern: str | None, max_length: int | None
) -> Any:
    compiled = re.compile(pattern) if pattern is not None else None

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        if minimum is not None and value < minimum:
            raise FieldValueError(attribute.name, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise FieldValueError(attribute.name, f"must be <= {maximum}, got {value}")
        if max_length is not None and len(value) > max_length:
            raise FieldValueError(
                attribute.name, f"must be at most {max_length} characters long"
            )
        if compiled is not None and compiled.fullmatch(value) is None:
            raise FieldValueError(attribute.name, f"must match {pattern}, got {value!r}")

    return check


def wire_field(
    *,
    default: Any = _NO_DEFAULT,
    description: str = "",
    minimum: int | None = None,
    maximum: int | None = None,
    pattern: str | None = None,
    max_length: int | None = None,
) -> Any:
    """An attrs field with wire checks and OpenRPC metadata.

    Args:
        default: the value when the key is absent (absent = required).
        description: shown in ``protocol/openrpc.json``.
        minimum, maximum: inclusive integer bounds.
        pattern: a regular expression the whole string must match.
        max_length: the longest accepted string.
    """
    metadata = {
        "description": description,
        "minimum": minimum,
        "maximum": maximum,
        "pattern": pattern,
        "max_length": max_length,
    }
    validator = None
    if any(v is not None for v in (minimum, maximum, pattern, max_length)):
        validator = _make_validator(minimum, maximum, pattern, max_length)
    return attrs.field(default=default, validator=validator, metadata={"wire": metadata})


def _strict(kind: type, label: str) -> Any:
    def hook(value: Any, _type: Any) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise WireTypeError(f"expected {label}, got a boolean")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise WireTypeError(f"expected {label}, got {_json_type(value)}")
        return value

    return hook


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_literal(tp: Any) -> bool:
    return get_origin(tp) is Literal


def _structure_literal(value: Any, tp: Any) -> Any:
    allowed = get_args(tp)
    for option in allowed:
        if type(value) is type(option) and value == option:
            return value
    choices = ", ".join(repr(a) for a in allowed)
    raise FieldValueError("", f"expected one of {choices}, got {_json_type(value)}")


def _structure_token(value: Any, _type: Any) -> int | str | None:
    if value is None or (isinstance(value, int | str) and not isinstance(value, bool)):
        return value
    raise WireTypeError(f"expected a string or an integer, got {_json_type(value)}")


def _reject_non_object(converter: cattrs.Converter) -> None:
    # cattrs would structure any mapping-like value; the wire only has objects.
    def is_attrs_class(tp: Any) -> bool:
        return isinstance(tp, type) and attrs.has(tp)

    def factory(tp: Any) -> Any:
        inner = cattrs.gen.make_dict_structure_fn(tp, converter, _cattrs_forbid_extra_keys=True)

        def hook(value: Any, _type: Any) -> Any:
            if not isinstance(value, dict):
                raise WireTypeError(f"expected an object, got {_json_type(value)}")
            return inner(value, _type)

        return hook

    converter.register_structure_hook_factory(is_attrs_class, factory)


def make_wire_converter() -> cattrs.Converter:
    """Build the one converter of the JSON-RPC wire format (strict; see module doc)."""
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(int, _strict(int, "an integer"))
    converter.register_structure_hook(float, _strict(float, "a number"))
    converter.register_structure_hook(str, _strict(str, "a string"))
    converter.register_structure_hook(bool, _strict(bool, "a boolean"))
    converter.register_structure_hook_func(_is_literal, _structure_literal)
    converter.register_structure_hook(int | str | None, _structure_token)  # progress tokens
    _reject_non_object(converter)
    from .models import register_model_hooks  # models import this module

    register_model_hooks(converter)
    return converter


def _describe(exc: BaseException, path: str) -> list[str]:
    if isinstance(exc, ForbiddenExtraKeysError):
        return [f"{path}.{key}: unknown field" for key in sorted(exc.extra_fields)]
    if isinstance(exc, ClassValidationError):
        out: list[str] = []
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            out += _describe(sub, f"{path}.{note.name}")
        for sub in without:
            out += _describe(sub, path)
        return out
    if isinstance(exc, IterableValidationError):
        out = []
        items, others = exc.group_exceptions()
        for sub, inote in items:
            out += _describe(sub, f"{path}[{inote.index}]")
        for sub in others:
            out += _describe(sub, path)
        return out
    if isinstance(exc, KeyError):
        return [f"{path}: required field missing"]
    if isinstance(exc, FieldValueError):
        where = f"{path}.{exc.name}" if exc.name else path
        return [f"{where}: {exc.reason}"]
    if isinstance(exc, WireTypeError | ValueError | TypeError):
        return [f"{path}: {exc}"]
    raise exc


def structure_params(converter: cattrs.Converter, value: Any, cls: type[T]) -> T:
    """Structure JSON-RPC ``params`` into ``cls``.

    ``None`` (no params) counts as ``{}``; positional (array) params are refused.

    Raises:
        RpcError: -32602 naming each offending field path.
    """
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise RpcError.invalid_params("params: must be an object (by-name parameters)")
    try:
        return converter.structure(value, cls)
    except Exception as exc:  # every failure becomes a readable -32602
        problems = _describe(exc, "params")
        raise RpcError.invalid_params("; ".join(problems)) from exc


def unstructure_result(converter: cattrs.Converter, value: Any) -> Any:
    """Turn a result model into JSON-ready data."""
    return converter.unstructure(value)

