"""Snapshot stores on a local directory (file://): push, list, pull, Diff merge, gc, errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from squibd.snapshot.envelope import read_state_file
from squibd.snapshot.manifest import KIND_FULL
from squibd.snapshot.verify import verify
from squibd.store.chunks import chunk_key
from squibd.store.config import StoreConfig
from squibd.store.errors import (
    ChunkInvalid,
    InvalidStoreName,
    ParentNotInStore,
    StoreConfigInvalid,
    StoreSnapshotNotFound,
)
from squibd.store.store import SnapshotStore
from tests.uffd._pairs import PAGE, page_pattern, vcpu_state, write_memory, write_state

MIB = 1024 * 1024


def make_pair(directory: Path, name: str, pages: dict[int, bytes], parent: str | None = None
              ) -> tuple[Path, str]:
    mem = directory / f"{name}.mem"
    manifest = write_memory(mem, pages, parent=parent)
    snap = directory / f"{name}.snap"
    write_state(snap, manifest, (vcpu_state(rip=0x1000),))
    return snap, manifest.pair_id


def full_pages() -> dict[int, bytes]:
    # data in both regions, a zero page run inside a written extent, and holes
    pages = {p: page_pattern(p) for p in range(0, 600)}
    pages.update({p: bytes(PAGE) for p in range(520, 1100)})  # a whole zero 2 MiB block
    pages.update({p: page_pattern(p) for p in range(1500, 1530)})
    return pages


def expected_memory(pages: dict[int, bytes], size: int) -> bytes:
    out = bytearray(size)
    for p, data in pages.items():
        out[p * PAGE:(p + 1) * PAGE] = data
    return bytes(out)


def test_push_list_pull_roundtrip_dedups(file_store: SnapshotStore, tmp_path: Path) -> None:
    pages = full_pages()
    snap, pair = make_pair(tmp_path, "a", pages)
    first = file_store.push(str(snap), "vm1/full-1", vm_id="vm1")
    assert first.pair_id == pair
    assert first.chunks_uploaded >= 2
    assert first.chunks_uploaded < first.chunks_total  # the zero block is not stored
    again = file_store.push(str(snap), "vm1/full-2")
    assert (again.chunks_uploaded, again.bytes_uploaded) == (0, 0)
    listed = file_store.list("vm1/")
    assert [s["name"] for s in listed] == ["vm1/full-1", "vm1/full-2"]
    assert listed[0]["vm_id"] == "vm1" and listed[0]["snapshot_type"] == KIND_FULL
    assert listed[0]["mem_size_bytes"] == os.path.getsize(tmp_path / "a.mem")
    assert file_store.list("other") == []

    out = tmp_path / "out"
    out.mkdir()
    result = file_store.pull("vm1/full-1", str(out / "p.snap"), str(out / "p.mem"))
    assert result.pair_id == pair
    data = (out / "p.mem").read_bytes()
    assert data == expected_memory(pages, len(data))
    verify(read_state_file(out / "p.snap"), str(out / "p.mem"), "full")


def test_diff_push_comes_down_as_merged_full(file_store: SnapshotStore, tmp_path: Path) -> None:
    pages = full_pages()
    base, base_pair = make_pair(tmp_path, "base", pages)
    changed = {p: page_pattern(p, 1) for p in (3, 4, 700, 1501, 2000)}
    diff, diff_pair = make_pair(tmp_path, "diff", changed, parent=base_pair)
    with pytest.raises(ParentNotInStore, match=base_pair):
        file_store.push(str(diff), "d")
    file_store.push(str(base), "b")
    pushed = file_store.push(str(diff), "d")
    assert pushed.chunks_uploaded == 4  # only the four touched blocks
    [listing] = [s for s in file_store.list() if s["name"] == "d"]
    assert listing["snapshot_type"] == "Diff" and listing["parent_pair_id"] == base_pair
    out = tmp_path / "o"
    out.mkdir()
    file_store.pull("d", str(out / "d.snap"), str(out / "d.mem"))
    state = read_state_file(out / "d.snap")
    assert state.memory.kind == KIND_FULL and state.memory.pair_id == diff_pair
    verify(state, str(out / "d.mem"), "full")
    merged = {**pages, **changed}
    data = (out / "d.mem").read_bytes()
    assert data == expected_memory(merged, len(data))


def test_corrupt_or_missing_chunk_fails_pull_naming_it(tmp_path: Path) -> None:
    config = StoreConfig(url=f"file://{tmp_path / 'store'}", cache_dir=str(tmp_path / "c1"))
    store = SnapshotStore("local", config)
    snap, _ = make_pair(tmp_path, "a", full_pages())
    store.push(str(snap), "s")
    refs = [r for r in store.get_snapshot("s").chunks if r.address]
    path = tmp_path / "store" / chunk_key(refs[1].address)
    stored = bytearray(path.read_bytes())
    stored[len(stored) // 2] ^= 0xFF
    path.write_bytes(bytes(stored))
    other = SnapshotStore("local", StoreConfig(url=config.url, cache_dir=str(tmp_path / "c2")))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ChunkInvalid) as info:
        other.pull("s", str(out / "s.snap"), str(out / "s.mem"))
    assert refs[1].address in str(info.value) and "'s'" in str(info.value)
    assert sorted(os.listdir(out)) == []  # nothing half-written
    path.unlink()
    with pytest.raises(ChunkInvalid, match="missing"):
        other.pull("s", str(out / "s.snap"), str(out / "s.mem"))
    assert sorted(os.listdir(out)) == []


def test_failed_push_leaves_no_snapshot_and_gc_removes_its_chunks(
    file_store: SnapshotStore, tmp_path: Path
) -> None:
    keep, _ = make_pair(tmp_path, "keep", {p: page_pattern(p, 7) for p in range(10)})
    file_store.push(str(keep), "keep")
    snap, _ = make_pair(tmp_path, "a", full_pages())

    def die(index: int) -> None:
        if index == 1:
            raise RuntimeError("push interrupted (fake)")

    with pytest.raises(RuntimeError):
        file_store.push(str(snap), "broken", chunk_hook=die)
    assert [s["name"] for s in file_store.list()] == ["keep"]
    with pytest.raises(StoreSnapshotNotFound):
        file_store.get_snapshot("broken")
    chunks_before = list(file_store.objects.list("chunks/"))
    assert len(chunks_before) > 1
    assert file_store.gc(grace_s=3600).chunks_deleted == 0  # too young
    result = file_store.gc(grace_s=0)
    assert result.chunks_deleted == len(chunks_before) - 1 and result.bytes_freed > 0
    out = tmp_path / "o"
    out.mkdir()
    file_store.pull("keep", str(out / "k.snap"), str(out / "k.mem"))  # still complete
    file_store.delete("keep")
    assert file_store.gc(grace_s=0).chunks_deleted == 1
    assert list(file_store.objects.list("chunks/")) == []


def test_gc_during_push_never_breaks_the_pushed_snapshot(
    file_store: SnapshotStore, tmp_path: Path
) -> None:
    snap, _ = make_pair(tmp_path, "a", full_pages())
    deleted: list[int] = []

    def gc_now(index: int) -> None:
        if index == 2:  # a gc (grace 0) runs while the push is part-way
            deleted.append(file_store.gc(grace_s=0).chunks_deleted)

    file_store.push(str(snap), "s", chunk_hook=gc_now)
    assert deleted and deleted[0] >= 1  # it did remove this push's early chunks
    fresh = SnapshotStore("local", attrs_evolve_cache(file_store.config, tmp_path / "c9"))
    out = tmp_path / "o"
    out.mkdir()
    fresh.pull("s", str(out / "s.snap"), str(out / "s.mem"))  # yet every chunk is there


def attrs_evolve_cache(config: StoreConfig, cache: Path) -> StoreConfig:
    import attrs

    return attrs.evolve(config, cache_dir=str(cache))


@pytest.mark.parametrize("name", ["", "a b", "x" * 201, "../etc", "a//b", "é"])
def test_bad_names_are_refused(file_store: SnapshotStore, tmp_path: Path, name: str) -> None:
    snap, _ = make_pair(tmp_path, "a", {0: page_pattern(0)})
    with pytest.raises(InvalidStoreName):
        file_store.push(str(snap), name)
    assert list(file_store.objects.list("")) == []


@pytest.mark.parametrize("url", ["http://x", "s3:///nobucket", "file://host/dir", "file:rel"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreConfigInvalid):
        StoreConfig(url=url)
