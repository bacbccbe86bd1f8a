"""The state-file envelope: header, CRC-64/Jones, load order, version rule, size limit."""

from __future__ import annotations

import struct
from pathlib import Path

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.snapshot.codec import encode_body
from squibd.snapshot.envelope import (
    CRC64_IS_C_EXTENSION,
    MAGIC_AARCH64,
    MAGIC_X86_64,
    STATE_SIZE_LIMIT,
    STATE_VERSION,
    crc64,
    decode_state,
    encode_state,
    parse_envelope,
    read_state_bytes,
    read_state_file,
    version_compatible,
)
from squibd.snapshot.errors import (
    Bitcode,
    CrcMismatch,
    Incompatible,
    InvalidPath,
    Io,
    MagicMismatch,
    SizeLimitExceeded,
    SnapshotError,
    TooShort,
    VersionMismatch,
)
from squibd.snapshot.models import DeviceState, MicrovmState, X86Regs
from tests.snapshot._states import sample_aarch64_state, sample_x86_state

from ._format_strategies import strategy_for

SMALL_FILE = encode_state(sample_aarch64_state(1, 1))
X86_FILE = encode_state(sample_x86_state(1, 1))


def with_crc(data: bytes) -> bytes:
    return data + struct.pack("<Q", crc64(data))


def wrap(body: bytes, *, magic: int = MAGIC_X86_64, version: bytes = b"1.0.0") -> bytes:
    """A file with any header and body and a correct CRC trailer."""
    return with_crc(struct.pack("<QQ", magic, len(version)) + version + body)


def test_crc64_jones_check_value() -> None:
    assert crc64(b"123456789") == 0xE9C6D914C4B8D9CA


def test_crc_uses_the_c_extension() -> None:
    assert CRC64_IS_C_EXTENSION


def test_crc_of_whole_file_including_trailer_is_zero() -> None:
    assert crc64(X86_FILE) == 0
    assert crc64(SMALL_FILE) == 0


def test_header_bytes_of_a_known_state() -> None:
    assert X86_FILE[:21] == bytes.fromhex("0000648684191007" "0500000000000000") + b"1.1.0"
    assert SMALL_FILE[:8] == bytes.fromhex("0000aaaa84191007")
    assert X86_FILE[21] & 0xF0 == 0x80  # the body is a MessagePack map


def test_round_trip_both_architectures() -> None:
    for state in (sample_x86_state(3, 2), sample_aarch64_state(2, 1)):
        assert decode_state(encode_state(state)) == state


@pytest.mark.parametrize(
    ("found", "ours", "ok"),
    [
        ("2.3.4", "2.3.4", True),
        ("2.3.0", "2.3.4", True),  # patch lower
        ("2.3.9", "2.3.4", True),  # patch higher: patch is free
        ("2.2.4", "2.3.4", True),  # minor lower
        ("2.4.4", "2.3.4", False),  # minor higher
        ("1.3.4", "2.3.4", False),  # major lower
        ("3.3.4", "2.3.4", False),  # major higher
        ("2.0.0", "2.3.4", True),
        ("02.3.4", "2.3.4", False),  # not semver
        ("2.3", "2.3.4", False),
        ("1.0.0", STATE_VERSION, True),
        ("1.0.5", STATE_VERSION, True),
        ("1.1.0", STATE_VERSION, True),
        ("1.1.7", STATE_VERSION, True),
        ("1.2.0", STATE_VERSION, False),
        ("0.9.0", STATE_VERSION, False),
        ("2.0.0", STATE_VERSION, False),
    ],
)
def test_version_rule_matrix(found: str, ours: str, ok: bool) -> None:
    assert version_compatible(found, ours) is ok


@pytest.mark.parametrize(("version", "loads"), [("1.0.0", True), ("1.0.42", True),
                                                ("1.1.0", True), ("1.2.0", False),
                                                ("2.0.0", False),
                                                ("0.1.0", False)])  # fmt: skip
def test_version_rule_applies_to_files(version: str, loads: bool) -> None:
    state = sample_aarch64_state(1, 1)
    data = wrap(encode_body(state), magic=MAGIC_AARCH64, version=version.encode())
    if loads:
        assert decode_state(data) == state
    else:
        with pytest.raises(VersionMismatch) as info:
            decode_state(data)
        assert str(info.value) == f"snapshot version {version} is incompatible with squib's 1.1.0"


def test_size_limit_boundary_in_memory() -> None:
    at_limit = bytes(STATE_SIZE_LIMIT)
    with pytest.raises(CrcMismatch):  # passes the size check, fails the next one
        parse_envelope(at_limit[:-8] + b"\x01" * 8)
    with pytest.raises(SizeLimitExceeded) as info:
        parse_envelope(at_limit + b"\x00")
    assert str(info.value) == "snapshot exceeds 10000000 byte deserialization limit"


def test_size_limit_boundary_on_disk(tmp_path: Path) -> None:
    at_limit, over = tmp_path / "at.snap", tmp_path / "over.snap"
    at_limit.write_bytes(bytes(STATE_SIZE_LIMIT))
    over.write_bytes(bytes(STATE_SIZE_LIMIT + 1))
    assert len(read_state_bytes(at_limit)) == STATE_SIZE_LIMIT
    with pytest.raises(SizeLimitExceeded):
        read_state_bytes(over)


def test_an_endless_device_is_refused_before_any_read() -> None:
    with pytest.raises(InvalidPath, match="is a character device, not a regular file"):
        read_state_bytes("/dev/zero")  # fstat says 0 bytes: never opened for reading


def test_missing_file_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(Io, match=r"No such file or directory \(os error 2\)"):
        read_state_file(tmp_path / "nope.snap")


def test_every_single_bit_flip_is_a_crc_mismatch() -> None:
    data = bytearray(SMALL_FILE)
    for bit in range(len(data) * 8):
        data[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CrcMismatch):
            decode_state(data)
        data[bit // 8] ^= 1 << (bit % 8)
    assert decode_state(data) == sample_aarch64_state(1, 1)


@pytest.mark.parametrize("data", [SMALL_FILE, X86_FILE], ids=["aarch64", "x86_64"])
def test_every_truncation_is_too_short_or_crc_mismatch(data: bytes) -> None:
    for length in range(len(data)):
        expected = TooShort if length < 8 else CrcMismatch
        with pytest.raises(expected):
            decode_state(data[:length])


def test_load_order_magic_before_version_before_body() -> None:
    with pytest.raises(MagicMismatch) as info:
        decode_state(wrap(b"garbage", magic=0xDEADBEEF, version=b"9.9.9"))
    assert str(info.value) == (
        "snapshot magic mismatch (file: 0xdeadbeef, expected: 0x710198486640000)"
    )
    with pytest.raises(VersionMismatch):
        decode_state(wrap(b"garbage", version=b"9.9.9"))
    with pytest.raises(Bitcode):
        decode_state(wrap(b"garbage"))


def test_header_that_ends_early_is_bitcode() -> None:
    with pytest.raises(Bitcode, match="header"):
        decode_state(with_crc(b"\x01\x02"))
    with pytest.raises(Bitcode, match="version length"):
        decode_state(with_crc(struct.pack("<QQ", MAGIC_X86_64, 1000) + b"1.0.0"))
    with pytest.raises(Bitcode, match="not ASCII"):
        decode_state(wrap(b"", version="1.0.\u00e9".encode()))


def test_incompatible_state_with_valid_crc_is_refused() -> None:
    state = sample_x86_state(1, 1)
    bad = attrs.evolve(state, vm_info=attrs.evolve(state.vm_info, vcpu_count=2))
    with pytest.raises(Incompatible) as info:
        decode_state(wrap(encode_body(bad)))
    assert "vcpu_count" in str(info.value.detail)


def test_encode_refuses_incompatible_and_oversized_states() -> None:
    state = sample_aarch64_state(1, 1)
    with pytest.raises(Incompatible):
        encode_state(attrs.evolve(state, vm_state=attrs.evolve(state.vm_state, gic_blob=b"")))
    huge = (DeviceState(kind="blk", id="big", mmio_slot=0, blob=bytes(STATE_SIZE_LIMIT)),)
    with pytest.raises(SizeLimitExceeded):
        encode_state(attrs.evolve(state, device_states=huge))


def test_describe_path_can_skip_the_crc() -> None:
    damaged = bytearray(X86_FILE)
    damaged[-1] ^= 0xFF
    envelope = parse_envelope(damaged, check_crc=False)
    assert (envelope.arch, envelope.version, envelope.crc_ok) == ("x86_64", "1.1.0", None)
    assert decode_state(damaged, check_crc=False) == sample_x86_state(1, 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_snapshot_errors(data: bytes) -> None:
    with pytest.raises(SnapshotError):
        decode_state(data)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([MAGIC_X86_64, MAGIC_AARCH64, 0, 0xDEADBEEF]),
    st.sampled_from([b"1.0.0", b"1.0.3", b"1.2.0", b"2.0.0", b"x", b""]),
    st.binary(max_size=300),
)
def test_valid_crc_around_random_bodies_raises_only_decode_kinds(
    magic: int, version: bytes, body: bytes
) -> None:
    with pytest.raises((Bitcode, MagicMismatch, VersionMismatch, Incompatible)):
        decode_state(wrap(body, magic=magic, version=version))


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(["x86_64", "aarch64"]),
    st.integers(1, 32),
    st.integers(1, 8),
    strategy_for(X86Regs),
    st.integers(0, 2**64 - 1),
)
def test_compatible_states_round_trip_through_the_envelope(
    arch: str, vcpus: int, mem_mib: int, regs: X86Regs, clock: int
) -> None:
    if arch == "x86_64":
        base = sample_x86_state(vcpus, mem_mib)
        first = attrs.evolve(base.vcpu_states[0], regs=regs)
        assert base.vm_state.clock is not None
        new_clock = attrs.evolve(base.vm_state.clock, clock=clock)
        state: MicrovmState = attrs.evolve(
            base, vcpu_states=(first, *base.vcpu_states[1:]),
            vm_state=attrs.evolve(base.vm_state, clock=new_clock),
        )  # fmt: skip
    else:
        arm = sample_aarch64_state(vcpus, mem_mib)
        state = attrs.evolve(arm, vcpu_states=(attrs.evolve(arm.vcpu_states[0], pc=clock),
                                               *arm.vcpu_states[1:]))  # fmt: skip
    data = encode_state(state)
    assert crc64(data) == 0
    assert decode_state(data) == state
