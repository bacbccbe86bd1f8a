"""The state-file body codec: MessagePack of a ``MicrovmState`` (SPEC section 3).

Theory of operation: one converter per format, built by
:func:`make_state_converter` from cattrs' msgpack preconf; the models carry
no serialization hooks. Decoding is strict, because a state file comes from
disk and may have been damaged or written by something else:

- every attrs class must arrive as a map with exactly its fields (extra keys
  and missing keys are errors);
- ``int`` must be a MessagePack integer (never a bool, float or string) that
  fits an unsigned 64-bit register; ``bool``, ``str`` and ``bytes`` must have
  exactly their MessagePack type (bytes stay bytes, never lists of ints);
- sequences must be arrays and mappings must be maps.

Any failure becomes :class:`~squibd.snapshot.errors.Bitcode` whose reason
names the field path, e.g. ``vcpu_states.0.regs.rip: expected an integer,
got str``. The architecture is not guessed from the body: the envelope picks
the class from the magic and passes it in.

Speed: decoding first runs a converter without cattrs' detailed validation
(same rules, first error wins); only a body that fails is structured again
with detailed validation to name every bad field. Encoding unstructures with
cattrs' generated code and checks the u64 rule in one walk over the result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Final, TypeVar, get_args, get_origin

import attrs
import cattrs
import msgpack
from cattrs.cols import homogenous_tuple_structure_factory, mapping_structure_factory
from cattrs.errors import (
    AttributeValidationNote,
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationNote,
)
from cattrs.preconf.msgpack import MsgpackConverter
from cattrs.preconf.msgpack import make_converter as _make_msgpack_converter

from .errors import Bitcode
from .manifest import MemoryManifest
from .models import Aarch64MicrovmState, MicrovmState, X86MicrovmState

__all__ = [
    "U64_MAX",
    "decode_body",
    "encode_body",
    "make_state_converter",
]

#: Every integer of the state models is a register, a size, an index or a
#: counter that the kernel keeps in (at most) a ``__u64``.
U64_MAX: Final = 2**64 - 1

_T = TypeVar("_T")

#: How many leaf errors a Bitcode message lists before summarising.
_MAX_REPORTED_ERRORS: Final = 3


def _type_name(value: object) -> str:
    return type(value).__name__


def _structure_u64(value: object, _: type) -> int:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {_type_name(value)}")
    if not 0 <= value <= U64_MAX:
        raise ValueError(f"integer {value} does not fit an unsigned 64-bit field")
    return value


def _check_u64_tree(plain: object) -> None:
    """Refuse integers outside u64 anywhere in an unstructured tree (before packing).

    One iterative walk is ~7x cheaper than a cattrs unstructure hook per int.
    """
    stack: list[object] = [plain]
    while stack:
        value = stack.pop()
        if type(value) is int:  # exactly int: bools are fine as they are
            if not 0 <= value <= U64_MAX:
                raise ValueError(f"integer {value} does not fit an unsigned 64-bit field")
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)


def _exact(expected: type, label: str) -> Callable[[object, type], Any]:
    def structure(value: object, _: type) -> Any:
        if type(value) is not expected:
            raise TypeError(f"expected {label}, got {_type_name(value)}")
        return value

    return structure


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = get_args(tp)
    return get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _is_dict(tp: Any) -> bool:
    return get_origin(tp) is dict


def _require(kind: type | tuple[type, ...], label: str, inner: Callable[..., Any]) -> Any:
    @functools.wraps(inner)
    def structure(value: object, tp: Any) -> Any:
        if not isinstance(value, kind):
            raise TypeError(f"expected {label}, got {_type_name(value)}")
        return inner(value, tp)

    return structure


def make_state_converter(*, detailed_validation: bool = True) -> MsgpackConverter:
    """Build the strict converter for state bodies (one per format, never global).

    Args:
        detailed_validation: collect every error with its field path (slower);
            without it the first error stops structuring, with the same rules.

    Returns:
        A cattrs ``MsgpackConverter`` that unstructures models into plain
        MessagePack-ready values and structures them back strictly (see the
        module docstring for the rules).
    """
    detailed = detailed_validation
    # use_alias: a field stored privately (``MemoryManifest._extents``) keeps its public key.
    conv = _make_msgpack_converter(
        forbid_extra_keys=True, detailed_validation=detailed, use_alias=True
    )
    conv.register_structure_hook(int, _structure_u64)
    # bool is a subclass of int: it needs its own hook or it would reach _structure_u64.
    conv.register_structure_hook(bool, _exact(bool, "a boolean"))
    conv.register_structure_hook(str, _exact(str, "a string"))
    conv.register_structure_hook(bytes, _exact(bytes, "bytes"))

    def attrs_factory(cls: type) -> Any:
        inner: Callable[..., Any] = cattrs.gen.make_dict_structure_fn(
            cls,
            conv,
            _cattrs_forbid_extra_keys=True,
            _cattrs_detailed_validation=detailed,
            _cattrs_use_alias=True,
        )
        return _require(dict, f"a map for {cls.__name__}", inner)

    def tuple_factory(tp: Any) -> Any:
        return _require((list, tuple), "an array", homogenous_tuple_structure_factory(tp, conv))

    def dict_factory(tp: Any) -> Any:
        return _require(dict, "a map", mapping_structure_factory(tp, conv))

    conv.register_structure_hook_factory(attrs.has, attrs_factory)
    # State format 1.1.0 added ``memory.page_map``; a manifest without one is
    # written without the key, exactly as 1.0.0 wrote it.
    conv.register_unstructure_hook(
        MemoryManifest,
        cattrs.gen.make_dict_unstructure_fn(
            MemoryManifest, conv, _cattrs_use_alias=True,
            page_map=cattrs.gen.override(omit_if_default=True),
        ),
    )  # fmt: skip
    conv.register_structure_hook_factory(_is_homogeneous_tuple, tuple_factory)
    conv.register_structure_hook_factory(_is_dict, dict_factory)
    return conv


@functools.cache
def _converter(detailed: bool) -> MsgpackConverter:
    # Built once per process and warmed for both state classes here, so that
    # worker threads never race to generate hooks lazily.
    conv = make_state_converter(detailed_validation=detailed)
    for cls in (X86MicrovmState, Aarch64MicrovmState):
        conv.get_structure_hook(cls)
        conv.get_unstructure_hook(cls)
    return conv


def _leaf_errors(exc: BaseException, path: tuple[str, ...]) -> list[tuple[str, BaseException]]:
    """Flatten a cattrs validation error group into ``(dotted path, leaf error)``."""
    step = list(path)
    for note in getattr(exc, "__notes__", ()):
        if isinstance(note, AttributeValidationNote):
            step.append(note.name.lstrip("_"))  # the key: attrs' default alias
        elif isinstance(note, IterableValidationNote):
            step.append(str(note.index))
    if isinstance(exc, BaseValidationError):
        leaves: list[tuple[str, BaseException]] = []
        for sub in exc.exceptions:
            leaves.extend(_leaf_errors(sub, tuple(step)))
        return leaves
    return [(".".join(step) or "<body>", exc)]


def _describe_leaf(path: str, exc: BaseException) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        keys = ", ".join(sorted(repr(k) for k in exc.extra_fields))
        return f"{path}: unexpected keys {keys}"
    if isinstance(exc, KeyError):
        return f"{path}: missing field"
    return f"{path}: {exc}"


def _bitcode_from(exc: BaseException) -> Bitcode:
    leaves = _leaf_errors(exc, ())
    parts = [_describe_leaf(path, leaf) for path, leaf in leaves[:_MAX_REPORTED_ERRORS]]
    more = len(leaves) - _MAX_REPORTED_ERRORS
    if more > 0:
        parts.append(f"and {more} more")
    return Bitcode("; ".join(parts) if parts else str(exc))


def encode_body(state: MicrovmState) -> bytes:
    """Encode a state model as the MessagePack body of a state file.

    Raises:
        Bitcode: a value cannot be represented (e.g. an integer outside u64).
    """
    try:
        plain = _converter(False).unstructure(state, unstructure_as=type(state))
        _check_u64_tree(plain)
        packed: bytes = msgpack.packb(plain, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise Bitcode(f"cannot encode {type(state).__name__}: {exc}") from exc
    return packed


def decode_body(body: bytes | memoryview, cls: type[_T]) -> _T:
    """Decode a MessagePack body into ``cls`` strictly.

    Args:
        body: exactly the body bytes (no header, no CRC trailer).
        cls: the state class the magic selected.

    Raises:
        Bitcode: the body is not MessagePack, has trailing bytes, or does not
            have the shape of ``cls``; the reason names the field path.
    """
    try:
        plain = msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises a zoo of types for damaged input
        raise Bitcode(f"body is not valid MessagePack: {exc}") from exc
    try:
        return _converter(False).structure(plain, cls)
    except Exception as fast_error:  # any failure: redo it with field paths
        try:
            _converter(True).structure(plain, cls)
        except (BaseValidationError, TypeError, ValueError, KeyError) as exc:
            raise _bitcode_from(exc) from exc
        raise Bitcode(f"<body>: {fast_error}") from fast_error
