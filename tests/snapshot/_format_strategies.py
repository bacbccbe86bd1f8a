"""Hypothesis strategies for the state models, derived from their type hints."""

from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin, get_type_hints

import attrs
from hypothesis import strategies as st

from squibd.snapshot.codec import U64_MAX

_U64 = st.one_of(st.integers(0, 255), st.integers(0, U64_MAX))


def strategy_for(tp: Any) -> st.SearchStrategy[Any]:
    """Any value of type ``tp`` the codec must round-trip (ints are u64)."""
    if attrs.has(tp):
        hints = get_type_hints(tp)
        fields = {f.alias: strategy_for(hints[f.name]) for f in attrs.fields(tp) if f.init}
        return st.builds(tp, **fields)
    origin = get_origin(tp)
    if origin is tuple:
        return st.lists(strategy_for(get_args(tp)[0]), max_size=3).map(tuple)
    if origin is dict:
        key, value = get_args(tp)
        return st.dictionaries(strategy_for(key), strategy_for(value), max_size=3)
    if origin in (Union, types.UnionType):
        return st.one_of(*(strategy_for(arg) for arg in get_args(tp)))
    simple: dict[Any, st.SearchStrategy[Any]] = {
        int: _U64,
        bool: st.booleans(),
        str: st.text(max_size=12),
        bytes: st.binary(max_size=24),
        type(None): st.none(),
    }
    return simple[tp]
