"""State format 1.1.0: scattered memory is stored as a page map and every pattern fits.

Issue 10: a guest that touched every other page of 3000 MiB produced ~384k
extents and a manifest above the 10 MB state-file limit. The compact form
(``memory.page_map``, manifest.py) bounds the manifest by the memory size,
whatever the dirty pattern.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from squibd.snapshot.codec import encode_body
from squibd.snapshot.commit import PairTransaction
from squibd.snapshot.compat import MIB
from squibd.snapshot.describe import describe_snapshot
from squibd.snapshot.digest import digest_function
from squibd.snapshot.envelope import STATE_SIZE_LIMIT, decode_state, encode_state, read_state_file
from squibd.snapshot.errors import Incompatible
from squibd.snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    PAGE_MAP_MIN_EXTENTS,
    MemoryManifest,
    MemoryRegion,
    compact_manifest,
    encode_page_map,
    page_map_runs,
    page_map_windows,
)
from squibd.snapshot.memerrors import MemoryDigestMismatch, MemoryPairMismatch
from squibd.snapshot.memwriter import build_manifest, new_pair_id, set_pair_xattr, write_memory
from squibd.snapshot.rebase import rebase
from squibd.snapshot.verify import check_pair_binding, verify
from squibd.vm.load import _map_file
from squibd.vm.memory import MMIO_GAP_END, GuestMemory, x86_layout
from tests.snapshot._states import minimal_x86_state, minimal_x86_vcpu

PAGE = 4096
XXH = digest_function("xxh3-64")
#: The largest guest the bound test covers: 32 GiB (more than this host's 24 GiB of RAM).
LARGEST_GUEST = 32 * 1024 * MIB


def _state(manifest: MemoryManifest, rip: int = 0x1000) -> object:
    return minimal_x86_state(manifest, (minimal_x86_vcpu(rip=rip),))


def _synthetic_manifest(written: np.ndarray, regions: tuple[MemoryRegion, ...]) -> MemoryManifest:
    """A compact manifest for a bitmap of written pages (random digests of the right count)."""
    size = sum(r.size for r in regions)
    probe = MemoryManifest(
        page_size=PAGE, regions=regions, kind="Full", file_size=size, pair_id=new_pair_id(),
        parent_pair_id=None, extents=(), digest_algorithm="xxh3-64",
        chunk_size=DEFAULT_CHUNK_SIZE, digests=b"", page_map=encode_page_map(written),
    )  # fmt: skip
    return attrs.evolve(probe, digests=os.urandom(8 * page_map_windows(probe)))


@pytest.mark.parametrize("pattern", ["every-other-page", "random"])
def test_worst_dirty_pattern_of_the_largest_guest_fits_the_state_file(pattern: str) -> None:
    """Every other 4 KiB page (the most extents) and random pages (the least compressible
    bitmap) of a 32 GiB guest: the state file stays far below the 10 MB limit."""
    regions = x86_layout(LARGEST_GUEST)
    pages = LARGEST_GUEST // PAGE
    if pattern == "every-other-page":
        written = np.zeros(pages, dtype=bool)
        written[::2] = True
    else:
        written = np.random.default_rng(10).random(pages) < 0.5
    manifest = _synthetic_manifest(written, regions)
    data = encode_state(_state(manifest))
    # Raw bitmap (1 MiB) + one digest per 2 MiB window (128 KiB) + the rest.
    bound = pages // 8 + (LARGEST_GUEST // DEFAULT_CHUNK_SIZE) * 8 + 64 * 1024
    assert len(data) <= bound < STATE_SIZE_LIMIT
    loaded = decode_state(data)
    assert loaded.memory == manifest
    assert loaded.memory.bytes_written == int(written.sum()) * PAGE
    if pattern == "every-other-page":  # the 1.0.0 form would need 4 Mi extents and digests
        offsets, lengths = page_map_runs(manifest, windows=False)
        assert offsets.size == pages // 2 and (lengths == PAGE).all()


def _regions_for(mem_mib: int) -> tuple[MemoryRegion, ...]:
    """Two regions whose boundary is not 2 MiB aligned (runs are cut there)."""
    low = mem_mib * MIB // 2 + 3 * PAGE
    return (MemoryRegion(0, low, 0), MemoryRegion(MMIO_GAP_END, mem_mib * MIB - low, low))


@contextlib.contextmanager
def _memory(regions: tuple[MemoryRegion, ...]) -> Iterator[GuestMemory]:
    memory = GuestMemory.shared(regions)
    try:
        yield memory
    finally:
        memory.close()


def _save(memory: GuestMemory, snap: Path, kind: str, *, runs: list[object] | None = None,
          parent: str | None = None, rip: int = 0x1000) -> MemoryManifest:
    pair_id = new_pair_id()
    with PairTransaction(str(snap), str(snap.with_suffix(".mem"))) as txn:
        result = write_memory(txn.mem_fd, memory.regions, kind=kind, runs_per_region=runs)
        set_pair_xattr(txn.mem_fd, pair_id)
        manifest = build_manifest(result, memory.regions, kind=kind, pair_id=pair_id,
                                  parent_pair_id=parent)  # fmt: skip
        txn.commit(encode_state(_state(manifest, rip)))
    return manifest


def _assert_same(a: GuestMemory, b: GuestMemory) -> None:
    """Equal content: the first and last 32 MiB of each region and every 97th page
    (the full check is ``verify(..., "full")`` against digests taken from ``b``)."""
    span = 32 * MIB
    for ours, theirs in zip(a.regions, b.regions, strict=True):
        assert ours.view[:span] == theirs.view[:span]
        assert ours.view[-span:] == theirs.view[-span:]
        mine = np.frombuffer(ours.view, dtype=np.uint8).reshape(-1, PAGE)[::97]
        other = np.frombuffer(theirs.view, dtype=np.uint8).reshape(-1, PAGE)[::97]
        assert np.array_equal(mine, other)


def test_alternating_pages_save_load_and_rebase_through_the_page_map(tmp_path: Path) -> None:
    """A real save of every other page of 1100 MiB (141k extents), loaded through load's pair
    check and mapping, then rebased. The 1.0.0 list form grows linearly with the extents (at
    this size it is already over 40% of the limit; 2500 MiB measured 9.93 MB); the page map
    stays small. ``test_worst_dirty_pattern_of_the_largest_guest_fits_the_state_file``
    covers the limit."""
    regions = _regions_for(1100)
    with _memory(regions) as memory:
        for region in memory.regions:  # every other page, each starting with its number
            words = np.frombuffer(region.view, dtype=np.uint64).reshape(-1, PAGE // 8)
            words[::2, 0] = np.arange(region.file_offset // PAGE, region.file_offset // PAGE
                                      + words.shape[0], dtype=np.uint64)[::2] + 1  # fmt: skip
            del words
        full = _save(memory, tmp_path / "full.snap", "Full")
        assert len(full.extents) > PAGE_MAP_MIN_EXTENTS
        assert len(encode_body(_state(full))) > 0.4 * STATE_SIZE_LIMIT  # the 1.0.0 form
        stored = read_state_file(str(tmp_path / "full.snap")).memory
        assert stored.page_map is not None and stored.stored_extents == ()
        assert stored.extents == full.extents and stored.pair_id == full.pair_id
        assert os.path.getsize(tmp_path / "full.snap") < 2 * MIB

        # Load (File backend) of the memory file without its pair xattr (as after a plain
        # cp): verified in full against the digests, then mapped.
        os.removexattr(tmp_path / "full.mem", "user.squibd.pair")
        state = read_state_file(str(tmp_path / "full.snap"))
        loaded = _map_file("big", state, str(tmp_path / "full.mem"))
        try:
            _assert_same(loaded, memory)
        finally:
            loaded.close()

        # A Diff of a few pages, then rebase: the output is again a page-map Full.
        memory.write(MMIO_GAP_END + 5 * PAGE, b"diff page")
        memory.write(7 * PAGE, b"another")
        runs = [[(7, 1)], [(5, 1)]]
        _save(memory, tmp_path / "diff.snap", "Diff", runs=runs, parent=full.pair_id, rip=0x2000)
        out = rebase(str(tmp_path / "full.snap"), [str(tmp_path / "diff.snap")],
                     str(tmp_path / "out.snap"))  # fmt: skip
        out_map = GuestMemory.from_file(str(tmp_path / "out.mem"), memory.manifest_regions())
        try:
            _assert_same(out_map, memory)
        finally:
            out_map.close()
    out_state = read_state_file(str(tmp_path / "out.snap"))
    assert out_state.memory.page_map is not None
    assert out_state.memory.extents == out.extents
    assert len(out.extents) == len(full.extents) - 2  # each Diff page joined two extents


def test_rebase_of_page_map_full_and_diff(tmp_path: Path) -> None:
    """Both inputs stored as page maps (and read back without their xattrs): the rebase
    equals the memory at the Diff's checkpoint."""
    regions = _regions_for(160)
    with _memory(regions) as memory:
        pages = memory.total_size // PAGE
        for page in range(0, pages, 2):
            memory.write(_addr(regions, page), page.to_bytes(8, "little") + b"F")
        full = _save(memory, tmp_path / "full.snap", "Full")
        runs: list[list[tuple[int, int]]] = [[], []]
        for page in range(1, pages, 2):
            memory.write(_addr(regions, page), page.to_bytes(8, "little") + b"D")
            index = 0 if page * PAGE < regions[1].file_offset else 1
            runs[index].append((page - regions[index].file_offset // PAGE, 1))
        _save(memory, tmp_path / "diff.snap", "Diff", runs=runs, parent=full.pair_id)  # type: ignore[arg-type]
        for name in ("full", "diff"):
            assert read_state_file(str(tmp_path / f"{name}.snap")).memory.page_map is not None
            os.removexattr(tmp_path / f"{name}.mem", "user.squibd.pair")
        out = rebase(str(tmp_path / "full.snap"), [str(tmp_path / "diff.snap")],
                     str(tmp_path / "out.snap"))  # fmt: skip
        assert [(e.offset, e.length) for e in out.extents] == [
            (r.file_offset, r.size) for r in regions
        ]
        out_map = GuestMemory.from_file(str(tmp_path / "out.mem"), memory.manifest_regions())
        try:
            for ours, theirs in zip(out_map.regions, memory.regions, strict=True):
                assert ours.view == theirs.view
        finally:
            out_map.close()


def _addr(regions: tuple[MemoryRegion, ...], page: int) -> int:
    offset = page * PAGE
    region = regions[0] if offset < regions[1].file_offset else regions[1]
    return region.guest_addr + offset - region.file_offset


# --- small, exhaustive checks of the compact form -----------------------------------------

SMALL = (MemoryRegion(0, 2 * MIB + 3 * PAGE, 0),
         MemoryRegion(0x1000_0000, 3 * MIB - 3 * PAGE, 2 * MIB + 3 * PAGE))  # fmt: skip
SMALL_PAGES = 5 * MIB // PAGE


def _small_full(tmp_path: Path, pages: list[int]) -> tuple[MemoryManifest, Path]:
    with _memory(SMALL) as memory:
        for page in pages:
            memory.write(_guest_addr(page), page.to_bytes(4, "little") + b"\x01")
        snap = tmp_path / "s.snap"
        return _save(memory, snap, "Full"), snap.with_suffix(".mem")


def _guest_addr(page: int) -> int:
    offset = page * PAGE
    for region in SMALL:
        if region.file_offset <= offset < region.file_offset + region.size:
            return region.guest_addr + offset - region.file_offset
    raise AssertionError(page)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.lists(st.integers(0, SMALL_PAGES - 1), min_size=1, max_size=60, unique=True))
def test_page_map_is_the_same_extents_and_verifies_like_the_list(
    tmp_path_factory: pytest.TempPathFactory, pages: list[int]
) -> None:
    """Any pattern (runs crossing windows and the unaligned region boundary): the compact
    form decodes to the writer's extents, and verification accepts it and names the
    window of a flipped byte."""
    directory = tmp_path_factory.mktemp("pm")
    legacy, mem = _small_full(directory, pages)
    compact = compact_manifest(legacy, XXH)
    assert compact is not None and compact.page_map is not None
    assert compact.extents == legacy.extents
    assert compact.bytes_written == legacy.bytes_written
    assert decode_state(encode_state(_state(compact))).memory == compact
    verify(compact, str(mem), "full")
    target = sorted(pages)[len(pages) // 2] * PAGE
    with open(mem, "r+b") as file:
        file.seek(target + 1)
        file.write(b"\xee")
    with pytest.raises(MemoryDigestMismatch) as info:
        verify(compact, str(mem), "full")
    assert info.value.offset <= target < info.value.offset + DEFAULT_CHUNK_SIZE
    os.removexattr(mem, "user.squibd.pair")
    fd = os.open(mem, os.O_RDONLY)
    try:
        with pytest.raises(MemoryPairMismatch, match=r"no user\.squibd\.pair xattr"):
            check_pair_binding(fd, compact)
    finally:
        os.close(fd)


def test_encode_state_compacts_only_many_extents(tmp_path: Path) -> None:
    legacy, _ = _small_full(tmp_path, [1, 3, 5])
    assert decode_state(encode_state(_state(legacy))).memory.page_map is None
    many = attrs.evolve(
        legacy,
        extents=tuple(attrs.evolve(legacy.extents[0], offset=p * 2 * PAGE, length=PAGE)
                      for p in range(SMALL_PAGES // 2)),
    )
    assert len(many.extents) <= PAGE_MAP_MIN_EXTENTS  # small guest: stays a list
    assert compact_manifest(many, XXH) is None  # digest count does not match: unfaithful


@pytest.mark.parametrize(
    ("mutate", "detail"),
    [
        (lambda m: attrs.evolve(m, page_map=b"not zlib"), "does not decompress"),
        (lambda m: attrs.evolve(m, page_map=encode_page_map(np.ones(3, dtype=bool))),
         "does not decompress to the"),
        (lambda m: attrs.evolve(m, page_map=encode_page_map(np.ones(SMALL_PAGES + 1, bool))),
         "does not decompress to the"),
        (lambda m: attrs.evolve(m, page_map=m.page_map + b"tail"), "does not decompress to the"),
        (lambda m: attrs.evolve(m, digests=m.digests[:-1]), "memory.digests holds"),
        (lambda m: attrs.evolve(m, extents=m.stored_extents + m.extents[:1]), "both extents"),
        (lambda m: attrs.evolve(m, chunk_size=3 * 1024), "not a multiple of memory.page_size"),
    ],
)  # fmt: skip
def test_inconsistent_page_maps_are_incompatible(tmp_path: Path, mutate: object,
                                                 detail: str) -> None:
    legacy, _ = _small_full(tmp_path, [0, 1, 2, 700, 1279])
    compact = compact_manifest(legacy, XXH)
    assert compact is not None
    bad = mutate(compact)  # type: ignore[operator]
    with pytest.raises(Incompatible) as info:
        decode_state(_raw_state_file(_state(bad)))
    assert detail in (info.value.detail or "")
    path = tmp_path / "bad.snap"
    path.write_bytes(_raw_state_file(_state(bad)))
    description = describe_snapshot(str(path))
    assert [e.kind for e in description.errors] == ["Incompatible"]


def _raw_state_file(state: object) -> bytes:
    """A state file of ``state`` with a valid CRC, without encode_state's checks."""
    from squibd.snapshot.envelope import MAGIC_X86_64, STATE_VERSION, crc64

    version = STATE_VERSION.encode()
    data = (MAGIC_X86_64.to_bytes(8, "little") + len(version).to_bytes(8, "little") + version
            + encode_body(state))  # type: ignore[arg-type]  # fmt: skip
    return data + crc64(data).to_bytes(8, "little")
