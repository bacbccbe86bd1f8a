"""verify(): none/size/full modes, flipped bytes name the chunk, other pairs are refused."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

from squibd.snapshot.bitmap import HOST_PAGE_SIZE
from squibd.snapshot.errors import MemoryIo
from squibd.snapshot.manifest import Extent, MemoryManifest, MemoryRegion
from squibd.snapshot.memerrors import MemoryDigestMismatch, MemoryInputInvalid, MemoryPairMismatch
from squibd.snapshot.memwriter import build_manifest, new_pair_id, set_pair_xattr, write_memory
from squibd.snapshot.verify import data_extents, first_difference, verify
from squibd.vm.memory import GuestMemory

PAGE = HOST_PAGE_SIZE
MIB = 1024 * 1024
LAYOUT = (MemoryRegion(0, 6 * MIB, 0),)


@attrs.frozen
class _State:
    """Anything with ``.memory`` is accepted; the real MicrovmState is one."""

    memory: MemoryManifest


def _save(path: Path, fill: bytes = b"\x11") -> MemoryManifest:
    with GuestMemory.shared(LAYOUT) as memory:
        memory.write(PAGE, fill * PAGE)
        memory.write(2 * MIB + 5 * PAGE, fill * 3 * MIB)  # spans chunks 1 and 2
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            result = write_memory(fd, memory.regions, kind="Full")
            pair_id = new_pair_id()
            set_pair_xattr(fd, pair_id)
        finally:
            os.close(fd)
        return build_manifest(result, memory.regions, kind="Full", pair_id=pair_id,
                              parent_pair_id=None)


def test_intact_file_passes_every_mode(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    manifest = _save(path)
    for mode in ("none", "size", "full"):
        verify(_State(manifest), str(path), mode)
    verify(manifest, str(path), "full")


def test_flipped_byte_fails_full_naming_the_chunk(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    manifest = _save(path)
    bad_offset = 4 * MIB + 123  # inside the third chunk [4 MiB, 5 MiB + 5 pages)
    with open(path, "r+b") as f:
        f.seek(bad_offset)
        byte = f.read(1)
        f.seek(bad_offset)
        f.write(bytes([byte[0] ^ 0x01]))
    verify(_State(manifest), str(path), "size")  # size cannot see it
    with pytest.raises(MemoryDigestMismatch) as caught:
        verify(_State(manifest), str(path), "full")
    assert caught.value.offset == 4 * MIB
    assert caught.value.kind == "MemoryIo"
    assert str(caught.value).startswith("memory file I/O error: Input/output error (os error 5)")
    assert f"offset {4 * MIB}" in str(caught.value)


def test_memory_file_of_another_pair_is_refused(tmp_path: Path) -> None:
    first, second = tmp_path / "a.mem", tmp_path / "b.mem"
    manifest = _save(first)
    _save(second)  # identical content, different pair id
    with pytest.raises(MemoryPairMismatch, match="belongs to pair"):
        verify(_State(manifest), str(second), "size")


def test_wrong_size_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    manifest = _save(path)
    os.truncate(path, 6 * MIB - PAGE)
    with pytest.raises(MemoryPairMismatch, match="bytes, the snapshot's manifest says"):
        verify(_State(manifest), str(path), "size")


def test_inconsistent_manifest_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    manifest = _save(path)
    broken = attrs.evolve(manifest, digests=manifest.digests[:-1])
    with pytest.raises(MemoryInputInvalid, match="digest bytes"):
        verify(broken, str(path), "full")
    outside = attrs.evolve(manifest, extents=(Extent(6 * MIB, PAGE),))
    with pytest.raises(MemoryInputInvalid, match="outside"):
        verify(outside, str(path), "full")


def test_missing_file_is_memory_io(tmp_path: Path) -> None:
    manifest = _save(tmp_path / "a.mem")
    with pytest.raises(MemoryIo, match=r"No such file or directory \(os error 2\)"):
        verify(manifest, str(tmp_path / "missing.mem"), "size")


def test_unknown_mode_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.mem"
    manifest = _save(path)
    with pytest.raises(ValueError, match="unknown verify mode"):
        verify(manifest, str(path), "fast")


def test_first_difference_and_data_extents(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(3 * PAGE))  # all data (written zeros)
    with open(b, "wb") as f:
        f.truncate(3 * PAGE)  # all hole
    assert first_difference(str(a), str(b)) is None  # holes read as zeros
    assert data_extents(str(b)) == []
    assert data_extents(str(a)) == [Extent(0, 3 * PAGE)]
    with open(b, "r+b") as f:
        f.seek(PAGE + 7)
        f.write(b"x")
    assert first_difference(str(a), str(b)) == PAGE + 7
    os.truncate(b, PAGE)
    assert first_difference(str(a), str(b)) == PAGE
