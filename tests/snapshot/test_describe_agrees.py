"""``describe`` agrees with load: a state file describe calls ok loads, and a file load
refuses is reported by describe with the same error kind (issue 10)."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from squibd.snapshot.codec import encode_body
from squibd.snapshot.compat import MIB
from squibd.snapshot.describe import describe_snapshot
from squibd.snapshot.digest import digest_function
from squibd.snapshot.envelope import MAGIC_X86_64, STATE_VERSION, crc64, decode_state
from squibd.snapshot.errors import SnapshotError
from squibd.snapshot.manifest import Extent, compact_manifest
from tests.snapshot._states import pattern_memory, sample_manifest, sample_x86_state

MEMORY = pattern_memory(2 * MIB)
LIST_STATE = sample_x86_state(1, 2, manifest=sample_manifest(2, memory=MEMORY))


def _compact_state() -> Any:
    import attrs

    from squibd.snapshot.digest import manifest_digests

    extents = tuple(Extent(p * 4096, 4096) for p in range(0, 512, 3))
    legacy = attrs.evolve(
        LIST_STATE.memory, extents=extents,
        digests=manifest_digests(lambda o, n: MEMORY[o : o + n], extents),
    )  # fmt: skip
    compact = compact_manifest(legacy, digest_function("xxh3-64"))
    assert compact is not None and compact.page_map is not None
    return attrs.evolve(LIST_STATE, memory=compact)


MAP_STATE = _compact_state()


def _file(body: bytes, *, version: bytes = STATE_VERSION.encode(),
          version_len: int | None = None) -> bytes:
    length = len(version) if version_len is None else version_len
    data = struct.pack("<QQ", MAGIC_X86_64, length) + version + body
    return data + struct.pack("<Q", crc64(data))


def _load_kind(data: bytes) -> str | None:
    """None when load accepts the file, else the error kind it raises."""
    try:
        decode_state(data)
    except SnapshotError as error:
        return error.kind
    return None


def _describe(data: bytes) -> Any:
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "x.snap")
        Path(path).write_bytes(data)
        return describe_snapshot(path)


def _assert_agree(data: bytes) -> str | None:
    kind = _load_kind(data)
    description = _describe(data)
    assert description.ok == (kind is None), (kind, description.errors)
    if kind is not None:
        assert description.errors[0].kind == kind
    return kind


def _plain(state: Any) -> Any:
    return msgpack.unpackb(encode_body(state), raw=False)


def _with(state: Any, change: Callable[[Any], None]) -> bytes:
    body = _plain(state)
    change(body)
    return _file(msgpack.packb(body, use_bin_type=True))


def _region(**values: int) -> Callable[[Any], None]:
    def change(body: Any) -> None:
        body["memory"]["regions"][0].update(values)

    return change


TOP = 1 << 64
CASES: list[tuple[str, bytes, str]] = [
    ("version length 2^63", _file(b"\x80", version=b"1.1.0", version_len=1 << 63), "Bitcode"),
    ("version length 65", _file(b"\x80" * 80, version=b"", version_len=65), "Bitcode"),
    ("header ends early", struct.pack("<Q", MAGIC_X86_64) + struct.pack(
        "<Q", crc64(struct.pack("<Q", MAGIC_X86_64))), "Bitcode"),
    ("version not ascii", _file(b"\x80", version="1.1.\u00e9".encode()), "Bitcode"),
    ("version 1.2.0", _file(encode_body(LIST_STATE), version=b"1.2.0"), "VersionMismatch"),
    ("region near 2^64", _with(LIST_STATE, _region(guest_addr=TOP - 2 * MIB)), "Incompatible"),
    ("region beyond 2^52", _with(LIST_STATE, _region(guest_addr=1 << 52)), "Incompatible"),
    ("region size overflows", _with(LIST_STATE, _region(size=TOP - 4096)), "Incompatible"),
    ("region unaligned to the host page", _with(LIST_STATE, _region(guest_addr=512)),
     "Incompatible"),
    ("extent beyond the file", _with(LIST_STATE, lambda b: b["memory"]["extents"][0].update(
        length=4 * MIB)), "Incompatible"),
    ("digest count", _with(LIST_STATE, lambda b: b["memory"].update(digests=b"1234567")),
     "Incompatible"),
    ("page map garbage", _with(MAP_STATE, lambda b: b["memory"].update(page_map=b"zz")),
     "Incompatible"),
    ("page map digest count", _with(MAP_STATE, lambda b: b["memory"].update(digests=b"")),
     "Incompatible"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "data", "kind"), CASES, ids=[c[0] for c in CASES])
def test_describe_reports_what_load_refuses(name: str, data: bytes, kind: str) -> None:
    assert _assert_agree(data) == (kind or None)


def test_overlapping_regions_are_refused_by_both() -> None:
    import attrs

    from squibd.snapshot.manifest import MemoryRegion

    half = MIB
    regions = (MemoryRegion(0, half, 0), MemoryRegion(half - 4096, half, half))
    state = attrs.evolve(LIST_STATE, memory=attrs.evolve(LIST_STATE.memory, regions=regions))
    assert _assert_agree(_file(encode_body(state))) == "Incompatible"


def test_valid_files_of_both_forms_agree() -> None:
    assert _assert_agree(_file(encode_body(LIST_STATE))) is None
    assert _assert_agree(_file(encode_body(MAP_STATE))) is None
    assert _assert_agree(_file(encode_body(LIST_STATE), version=b"1.0.0")) is None


# --- random mutations of a valid body --------------------------------------------------

_INTS = st.one_of(
    st.sampled_from([0, 1, 4095, 4096, MIB, 2 * MIB, 1 << 52, (1 << 52) - 4096, 1 << 63,
                     TOP - 1, TOP - 4096, TOP - 2 * MIB]),
    st.integers(-(1 << 63), TOP - 1),
)  # fmt: skip
_VALUES = st.one_of(
    _INTS, st.booleans(), st.none(), st.text(max_size=8), st.binary(max_size=16),
    st.lists(_INTS, max_size=3), st.dictionaries(st.text(max_size=6), _INTS, max_size=2),
)  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        children: list[tuple[Any, Any]] = list(node.items())
    elif isinstance(node, list):
        children = list(enumerate(node))
    else:
        return found
    for key, child in children:
        found.append((*prefix, key))
        found.extend(_paths(child, (*prefix, key)))
    return found


def _container(body: Any, path: tuple[Any, ...]) -> Any:
    for key in path[:-1]:
        body = body[key]
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_body_mutations_describe_ok_iff_load_accepts(data: st.DataObject) -> None:
    base = data.draw(st.sampled_from([LIST_STATE, MAP_STATE]), label="base")
    body = _plain(base)
    # Memory-manifest paths are where the subtle checks are: draw them more often.
    every = _paths(body)
    memory = [p for p in every if p[0] == "memory"]
    path = data.draw(st.one_of(st.sampled_from(memory), st.sampled_from(every)), label="path")
    container, key = _container(body, path), path[-1]
    action = data.draw(st.sampled_from(["replace", "delete", "add", "small-int"]), label="do")
    if action == "replace":
        container[key] = data.draw(_VALUES, label="value")
    elif action == "small-int" and isinstance(container[key], int) and not isinstance(
            container[key], bool):
        container[key] = container[key] + data.draw(st.sampled_from([-4096, -1, 1, 4096]))
    elif action == "delete":
        del container[key]
    elif isinstance(container, dict):
        container[data.draw(st.text(max_size=6), label="new key")] = 0
    else:
        container.append(container[key])
    kind = _assert_agree(_file(msgpack.packb(body, use_bin_type=True)))
    event(f"load: {kind or 'ok'}")


def test_page_map_decoding_is_bounded() -> None:
    """A small compressed map claiming a 1 TiB guest is refused before it is inflated."""
    import zlib

    tib = 1 << 40
    bomb = zlib.compress(bytes(tib // 4096 // 8), 9)
    assert len(bomb) < 100_000

    def change(body: Any) -> None:
        body["vm_info"]["mem_size_mib"] = tib // MIB
        body["memory"]["regions"][0]["size"] = tib
        body["memory"].update(file_size=tib, page_map=bomb)

    assert _assert_agree(_with(MAP_STATE, change)) == "Incompatible"
    with pytest.raises(SnapshotError) as info:
        decode_state(_with(MAP_STATE, change))
    assert "more than" in str(getattr(info.value, "detail", ""))
