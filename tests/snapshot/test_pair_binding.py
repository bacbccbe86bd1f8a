"""One pair check for every reader (issue 10): size, xattr, or every digest without it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from squibd.snapshot.commit import PairTransaction
from squibd.snapshot.describe import describe_snapshot
from squibd.snapshot.envelope import encode_state, read_state_file
from squibd.snapshot.manifest import MemoryManifest, MemoryRegion
from squibd.snapshot.memerrors import MemoryPairMismatch
from squibd.snapshot.memwriter import build_manifest, new_pair_id, set_pair_xattr, write_memory
from squibd.snapshot.pairing import read_pair_xattr
from squibd.snapshot.rebase import rebase
from squibd.snapshot.verify import check_pair_binding
from squibd.vm.memory import GuestMemory
from tests.snapshot._states import minimal_x86_state, minimal_x86_vcpu

MIB = 1024 * 1024
LAYOUT = (MemoryRegion(0, 4 * MIB, 0),)


def _save(memory: GuestMemory, snap: Path, kind: str, parent: str | None = None,
          runs: list[object] | None = None) -> MemoryManifest:
    pair_id = new_pair_id()
    with PairTransaction(str(snap), str(snap.with_suffix(".mem"))) as txn:
        result = write_memory(txn.mem_fd, memory.regions, kind=kind, runs_per_region=runs)
        if not set_pair_xattr(txn.mem_fd, pair_id):
            pytest.skip("this filesystem keeps no user xattrs")
        manifest = build_manifest(result, memory.regions, kind=kind, pair_id=pair_id,
                                  parent_pair_id=parent)  # fmt: skip
        txn.commit(encode_state(minimal_x86_state(manifest, (minimal_x86_vcpu(rip=0x1000),))))
    return manifest


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    """``a`` and ``b``: two Full pairs of the same layout and different content; ``d``: a
    Diff on ``a``."""
    memory = GuestMemory.shared(LAYOUT)
    try:
        memory.write(0, b"pair A".ljust(3 * MIB, b"a"))
        a = _save(memory, tmp_path / "a.snap", "Full")
        memory.write(MIB, b"pair B")
        _save(memory, tmp_path / "b.snap", "Full")
        memory.write(2 * MIB, b"diff")
        _save(memory, tmp_path / "d.snap", "Diff", parent=a.pair_id, runs=[[(512, 1)]])
    finally:
        memory.close()
    return tmp_path


def _binding(mem: Path, snap: Path) -> bool:
    fd = os.open(mem, os.O_RDONLY)
    try:
        return check_pair_binding(fd, read_state_file(str(snap)).memory, path=str(mem))
    finally:
        os.close(fd)


def test_copy_of_another_pair_without_xattr_is_refused(pairs: Path) -> None:
    shutil.copyfile(pairs / "b.mem", pairs / "stray.mem")
    assert read_pair_xattr(str(pairs / "stray.mem")) is None
    with pytest.raises(MemoryPairMismatch, match=r"no user\.squibd\.pair xattr") as info:
        _binding(pairs / "stray.mem", pairs / "a.snap")
    assert info.value.kind == "MemoryIo"
    assert "stray.mem" in str(info.value)
    description = describe_snapshot(str(pairs / "a.snap"), memory_file=str(pairs / "stray.mem"))
    assert [e.kind for e in description.errors] == ["MemoryIo"]
    # Rebase inputs get the same check.
    os.replace(pairs / "stray.mem", pairs / "a.mem")
    with pytest.raises(MemoryPairMismatch, match="does not match"):
        rebase(str(pairs / "a.snap"), [str(pairs / "d.snap")], str(pairs / "out.snap"))
    assert not (pairs / "out.snap").exists()


def test_genuine_copy_without_xattr_is_verified_and_accepted(pairs: Path) -> None:
    assert _binding(pairs / "a.mem", pairs / "a.snap") is False  # the xattr proves it
    shutil.copyfile(pairs / "a.mem", pairs / "copy.mem")
    assert _binding(pairs / "copy.mem", pairs / "a.snap") is True  # the digests prove it
    assert describe_snapshot(str(pairs / "a.snap"), memory_file=str(pairs / "copy.mem")).ok
    shutil.copyfile(pairs / "a.mem", pairs / "a2.mem")
    os.replace(pairs / "a2.mem", pairs / "a.mem")  # rebase input without the xattr
    rebase(str(pairs / "a.snap"), [str(pairs / "d.snap")], str(pairs / "out.snap"))
    assert read_state_file(str(pairs / "out.snap")).memory.kind == "Full"


def test_xattr_of_another_pair_and_wrong_size_are_refused(pairs: Path) -> None:
    with pytest.raises(MemoryPairMismatch, match="belongs to pair"):
        _binding(pairs / "b.mem", pairs / "a.snap")
    with open(pairs / "a.mem", "r+b") as file:
        file.truncate(MIB)
    with pytest.raises(MemoryPairMismatch, match="is 1048576 bytes"):
        _binding(pairs / "a.mem", pairs / "a.snap")
