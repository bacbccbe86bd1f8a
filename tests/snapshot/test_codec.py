"""The state body codec: round trips, strictness, field paths in Bitcode."""

from __future__ import annotations

import contextlib
from typing import Any

import cattrs
import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.snapshot.codec import U64_MAX, decode_body, encode_body, make_state_converter
from squibd.snapshot.errors import Bitcode
from squibd.snapshot.models import Aarch64MicrovmState, X86MicrovmState
from tests.snapshot._states import sample_aarch64_state, sample_x86_state

from ._format_strategies import strategy_for

SETTINGS = settings(max_examples=40, deadline=None)


def plain(state: Any) -> Any:
    """The MessagePack value tree of a state's body."""
    return msgpack.unpackb(encode_body(state), raw=False)


def decode_plain(value: Any, cls: type) -> Any:
    return decode_body(msgpack.packb(value, use_bin_type=True), cls)


@SETTINGS
@given(strategy_for(X86MicrovmState))
def test_x86_state_round_trips(state: X86MicrovmState) -> None:
    assert decode_body(encode_body(state), X86MicrovmState) == state


@SETTINGS
@given(strategy_for(Aarch64MicrovmState))
def test_aarch64_state_round_trips(state: Aarch64MicrovmState) -> None:
    assert decode_body(encode_body(state), Aarch64MicrovmState) == state


def test_bytes_stay_bytes_on_the_wire_and_after_decoding() -> None:
    state = sample_x86_state(1)
    raw = msgpack.unpackb(encode_body(state), raw=True)
    assert isinstance(raw[b"vcpu_states"][0][b"xsave"], bytes)  # a bin, not an array
    assert isinstance(raw[b"vcpu_states"][0][b"regs"][b"rip"], int)
    decoded = decode_body(encode_body(state), X86MicrovmState)
    assert type(decoded.vcpu_states[0].lapic) is bytes
    assert type(decoded.vcpu_states[0].cpuid) is tuple


def test_converter_factory_builds_a_fresh_converter() -> None:
    first, second = make_state_converter(), make_state_converter()
    assert first is not second
    assert first is not cattrs.global_converter


def test_wrong_type_names_the_field_path() -> None:
    body = plain(sample_x86_state(2))
    body["vcpu_states"][1]["regs"]["rip"] = "0x1000"
    with pytest.raises(Bitcode) as info:
        decode_plain(body, X86MicrovmState)
    assert "vcpu_states.1.regs.rip: expected an integer, got str" in str(info.value)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b: b["vm_info"].update(surprise=1), "vm_info: unexpected keys 'surprise'"),
        (lambda b: b["vm_info"].pop("vcpu_count"), "vm_info.vcpu_count: missing field"),
        (lambda b: b["vm_info"].update(smt=0), "vm_info.smt: expected a boolean, got int"),
        (lambda b: b["vm_info"].update(mem_size_mib=True), "vm_info.mem_size_mib: expected an"),
        (lambda b: b["vm_info"].update(mem_size_mib=1.5), "vm_info.mem_size_mib: expected an"),
        (lambda b: b["vm_state"]["clock"].update(clock=-1), "vm_state.clock.clock: integer -1"),
        (lambda b: b["vcpu_states"][0].update(xsave=[1, 2]), "vcpu_states.0.xsave: expected bytes"),
        (lambda b: b["vcpu_states"][0].update(lapic="text"), "vcpu_states.0.lapic: expected bytes"),
        (lambda b: b.update(device_states={}), "device_states: expected an array"),
        (lambda b: b["vcpu_states"].__setitem__(0, [1]), "vcpu_states.0: expected a map"),
        (lambda b: b["vm_info"].update(guest_params=[1]), "vm_info.guest_params: expected a map"),
        (lambda b: b["vm_info"]["guest_params"].update(k="v"), "vm_info.guest_params.k:"),
        (lambda b: b["mmds_state"].update(data_json=b"x"), "mmds_state.data_json: expected a str"),
        (lambda b: b["memory"]["extents"][0].update(offset=None), "memory.extents.0.offset"),
    ],
)
def test_strict_decoding_rejects_wrong_shapes(mutate: Any, expected: str) -> None:
    body = plain(sample_x86_state(1))
    mutate(body)
    with pytest.raises(Bitcode) as info:
        decode_plain(body, X86MicrovmState)
    assert expected in str(info.value)
    assert str(info.value).startswith("snapshot encoding error: ")


def test_many_errors_are_summarised() -> None:
    body = plain(sample_x86_state(2))
    for vcpu in body["vcpu_states"]:
        for name in vcpu["regs"]:
            vcpu["regs"][name] = "bad"
    with pytest.raises(Bitcode) as info:
        decode_plain(body, X86MicrovmState)
    assert info.value.reason.endswith("and 33 more")


def test_largest_u64_round_trips_and_anything_beyond_is_refused_on_encode() -> None:
    state = sample_x86_state(1)
    body = plain(state)
    body["vm_state"]["clock"]["clock"] = U64_MAX
    assert decode_plain(body, X86MicrovmState).vm_state.clock.clock == U64_MAX
    import attrs

    too_big = attrs.evolve(state, vm_state=attrs.evolve(
        state.vm_state, clock=attrs.evolve(state.vm_state.clock, clock=U64_MAX + 1)))  # fmt: skip
    with pytest.raises(Bitcode, match="does not fit an unsigned 64-bit field"):
        encode_body(too_big)


def test_body_with_trailing_bytes_is_refused() -> None:
    with pytest.raises(Bitcode, match="not valid MessagePack"):
        decode_body(encode_body(sample_aarch64_state()) + b"\x00", Aarch64MicrovmState)


def test_architecture_is_the_callers_choice_not_guessed() -> None:
    with pytest.raises(Bitcode):
        decode_body(encode_body(sample_aarch64_state()), X86MicrovmState)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
    | st.binary(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(_msgpack_values)
def test_arbitrary_msgpack_values_decode_or_raise_bitcode(value: Any) -> None:
    with contextlib.suppress(Bitcode):  # decoding may succeed only by luck; nothing else
        decode_plain(value, X86MicrovmState)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_bitcode(data: bytes) -> None:
    with pytest.raises(Bitcode):
        decode_body(data, Aarch64MicrovmState)
