"""PageSource (Full + Diffs, newest wins, digest checked) and the prefetch page walk."""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.snapshot.manifest import MemoryRegion
from squibd.uffd import ChunkCorrupt, PageSource, SnapshotMismatch, prefetch_offsets
from squibd.uffd.prefetch import translate

from ._pairs import MEM_SIZE, PAGE, REGIONS, page_pattern, vcpu_state, write_memory

PAGES = MEM_SIZE // PAGE
_layer = st.dictionaries(st.integers(0, PAGES - 1), st.just(b""), max_size=12)


@settings(max_examples=15, deadline=None)
@given(st.lists(_layer, min_size=1, max_size=4))
def test_each_page_comes_from_the_newest_layer_that_wrote_it(layers: list[dict[int, bytes]]
                                                             ) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        chain = []
        parent = None
        for version, pages in enumerate(layers):
            path = Path(tmp) / f"{version}.mem"
            manifest = write_memory(path, {p: page_pattern(p, version) for p in pages},
                                    parent=parent)
            chain.append((str(path), manifest))
            parent = manifest.pair_id
        source = PageSource.open(chain)
        try:
            touched = sorted({p for pages in layers for p in pages} | {0, PAGES - 1})
            for page in touched:
                newest = max((v for v, pages in enumerate(layers) if page in pages), default=None)
                expected = bytes(PAGE) if newest is None else page_pattern(page, newest)
                assert source.read(page * PAGE, PAGE) == expected
        finally:
            source.close()


def test_corrupt_chunk_raises_with_its_offset(tmp_path: Path) -> None:
    manifest = write_memory(tmp_path / "f.mem", {600: page_pattern(600), 3: page_pattern(3)})
    with open(tmp_path / "f.mem", "r+b") as mem:
        mem.seek(600 * PAGE)
        mem.write(b"\xff")
    source = PageSource.open([(str(tmp_path / "f.mem"), manifest)])
    try:
        assert source.read(3 * PAGE, PAGE) == page_pattern(3)
        with pytest.raises(ChunkCorrupt, match=hex(600 * PAGE)):
            source.read(600 * PAGE, 8)
    finally:
        source.close()


def test_diff_of_another_parent_is_refused(tmp_path: Path) -> None:
    full = write_memory(tmp_path / "a.mem", {1: page_pattern(1)})
    diff = write_memory(tmp_path / "b.mem", {2: page_pattern(2)}, parent="someone-else")
    with pytest.raises(SnapshotMismatch, match="applies to pair someone-else"):
        PageSource.open([(str(tmp_path / "a.mem"), full), (str(tmp_path / "b.mem"), diff)])


def test_memory_file_of_another_pair_is_refused(tmp_path: Path) -> None:
    one = write_memory(tmp_path / "a.mem", {1: page_pattern(1)})
    write_memory(tmp_path / "b.mem", {1: page_pattern(1)})
    with pytest.raises(SnapshotMismatch, match="belongs to pair"):
        PageSource.open([(str(tmp_path / "b.mem"), one)])


def _paged_memory() -> tuple[dict[int, bytes], int, int]:
    """4-level page tables at pages 1-4 mapping 0x7000_0000_1000 -> page 9, plus a 2 MiB page."""
    pages = {p: bytearray(PAGE) for p in range(1, 5)}
    linear = 0x7000_0000_1000
    entries = [(linear >> shift) & 0x1FF for shift in (39, 30, 21, 12)]
    struct.pack_into("<Q", pages[1], entries[0] * 8, 2 * PAGE | 0x7)
    struct.pack_into("<Q", pages[2], entries[1] * 8, 3 * PAGE | 0x7)
    struct.pack_into("<Q", pages[3], entries[2] * 8, 4 * PAGE | 0x7)
    struct.pack_into("<Q", pages[4], entries[3] * 8, 9 * PAGE | 0x7)
    # A 2 MiB page at PD index entries[2] + 1 mapping guest-physical 0x20_0000.
    struct.pack_into("<Q", pages[3], (entries[2] + 1) * 8, 0x20_0000 | 0x87)
    return {p: bytes(b) for p, b in pages.items()}, linear, 1 * PAGE


CR0_PG, CR4_PAE, EFER_LMA_LME = 1 << 31, 1 << 5, (1 << 10) | (1 << 8)


def test_page_walk_finds_tables_and_targets(tmp_path: Path) -> None:
    pages, linear, cr3 = _paged_memory()
    manifest = write_memory(tmp_path / "p.mem", pages)
    source = PageSource.open([(str(tmp_path / "p.mem"), manifest)])
    try:
        regs = {"cr0": CR0_PG, "cr3": cr3, "cr4": CR4_PAE, "efer": EFER_LMA_LME,
                "regions": REGIONS, "read": source.read}
        tables = [p * PAGE for p in (1, 2, 3, 4)]
        assert translate(linear + 0x123, **regs) == (9 * PAGE + 0x123, tables)
        # The 2 MiB page covers linear + 0x20_0000 - 0x1000 onwards (linear is 4 KiB past a
        # 2 MiB boundary), so the offset inside it keeps that 0x1000.
        assert translate(linear + 0x20_0000 + 0x5678, **regs)[0] == 0x20_0000 + 0x6678
        assert translate(0x10_0000_0000, **regs)[0] is None  # not mapped
        vcpu = vcpu_state(rip=linear + 8, rsp=linear + 0x20_0000 + PAGE, cr0=CR0_PG, cr3=cr3,
                          cr4=CR4_PAE, efer=EFER_LMA_LME)
        offsets = prefetch_offsets([vcpu], REGIONS, source.read, PAGE)
        assert offsets[:5] == [PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE, 9 * PAGE]
        assert 0x20_0000 + 2 * PAGE in offsets and 0x20_0000 + PAGE in offsets  # RSP, RSP - 8
    finally:
        source.close()


def test_page_walk_maps_the_second_region_through_its_file_offset() -> None:
    regions = (MemoryRegion(0, 4 * 1024 * 1024, 0), MemoryRegion(0x1000_0000, PAGE, 4096 * 1024))
    vcpu = vcpu_state(rip=0x1000_0000 + 5, rsp=0)
    offsets = prefetch_offsets([vcpu], regions, lambda off, n: bytes(n), PAGE)
    assert offsets[0] == 4096 * 1024


def test_prefetch_includes_enabled_paravirtual_areas_only() -> None:
    import attrs

    from squibd.snapshot.models import MsrEntry

    kvmclock, steal, disabled = 0x3000 | 1, 0x5040 | 1, 0x7000
    vcpu = attrs.evolve(
        vcpu_state(rip=0x1000, rsp=0x1000),
        msrs=(MsrEntry(0x4B564D01, kvmclock), MsrEntry(0x4B564D03, steal),
              MsrEntry(0x4B564D04, disabled), MsrEntry(0x10, 0x9000 | 1)),
    )
    offsets = prefetch_offsets([vcpu], REGIONS, lambda off, n: bytes(n), PAGE)
    assert 0x3000 in offsets and 0x5000 in offsets
    assert 0x7000 not in offsets and 0x9000 not in offsets  # disabled / not a PV MSR
