"""The first-touched pages a push records, and the page source fetching them at once."""

from __future__ import annotations

import struct
from pathlib import Path

import blake3
import msgpack

from squibd.snapshot.envelope import read_state_file
from squibd.store.chunks import address_of, decode_chunk
from squibd.store.source import StoreSource
from squibd.store.store import SnapshotStore
from squibd.uffd.prefetch import prefetch_offsets
from squibd.uffd.source import PageSource
from tests.uffd._pairs import PAGE, REGIONS, page_pattern, vcpu_state, write_memory, write_state

CR0_PG, CR4_PAE, EFER_LMA_LME = 1 << 31, 1 << 5, (1 << 10) | (1 << 8)
LINEAR = 0x7000_0000_1000


def _tables(target_page: int) -> dict[int, bytes]:
    """4-level page tables at pages 1-4 mapping LINEAR to ``target_page``."""
    pages = {p: bytearray(PAGE) for p in range(1, 5)}
    entries = [(LINEAR >> shift) & 0x1FF for shift in (39, 30, 21, 12)]
    for level, page in enumerate((2, 3, 4, target_page)):
        struct.pack_into("<Q", pages[level + 1], entries[level] * 8, page * PAGE | 0x7)
    return {p: bytes(b) for p, b in pages.items()}


def _pair(directory: Path, name: str, pages: dict[int, bytes],
          parent: str | None = None) -> tuple[Path, str]:
    manifest = write_memory(directory / f"{name}.mem", pages, parent=parent)
    vcpu = vcpu_state(rip=LINEAR + 8, rsp=LINEAR + PAGE, cr0=CR0_PG, cr3=PAGE,
                      cr4=CR4_PAE, efer=EFER_LMA_LME)
    write_state(directory / f"{name}.snap", manifest, (vcpu,))
    return directory / f"{name}.snap", manifest.pair_id


def _walk(snap: Path) -> list[int]:
    state = read_state_file(snap)
    source = PageSource.open([(str(snap)[:-5] + ".mem", state.memory)])
    try:
        return prefetch_offsets(state.vcpu_states, REGIONS, source.read, PAGE)
    finally:
        source.close()


def test_push_records_the_pages_the_vcpus_touch_first(file_store: SnapshotStore,
                                                      tmp_path: Path) -> None:
    pages = {**_tables(9), 9: page_pattern(9), 700: page_pattern(700)}
    full, pair = _pair(tmp_path, "full", pages)
    file_store.push(str(full), "p/full")
    stored = file_store.get_snapshot("p/full").prefetch
    assert list(stored) == _walk(full)
    assert list(stored[:5]) == [PAGE, 2 * PAGE, 3 * PAGE, 4 * PAGE, 9 * PAGE]

    # A Diff re-pointing LINEAR: the recorded pages follow the merged memory.
    diff, _ = _pair(tmp_path, "diff", {4: _tables(12)[4], 12: page_pattern(12)}, parent=pair)
    file_store.push(str(diff), "p/diff")
    merged = file_store.get_snapshot("p/diff").prefetch
    assert 12 * PAGE in merged and 9 * PAGE not in merged
    out = tmp_path / "out"
    out.mkdir()
    file_store.pull("p/diff", str(out / "m.snap"), str(out / "m.mem"))
    assert list(merged) == _walk(out / "m.snap")


def test_snapshot_object_without_prefetch_still_parses(file_store: SnapshotStore,
                                                       tmp_path: Path) -> None:
    full, _ = _pair(tmp_path, "full", {**_tables(9), 9: page_pattern(9)})
    file_store.push(str(full), "old")
    raw = file_store.get_snapshot_raw("old")
    body = msgpack.unpackb(raw[:-32], raw=False)
    del body["prefetch"]  # as written before the field existed
    packed = msgpack.packb(body, use_bin_type=True)
    old = file_store.parse("old", packed + blake3.blake3(packed).digest())
    assert old.prefetch == () and old.chunks == file_store.get_snapshot("old").chunks


def test_page_source_fetches_prefetch_blocks_and_caches_them(file_store: SnapshotStore,
                                                             tmp_path: Path) -> None:
    pages = {**_tables(9), 9: page_pattern(9), 1500: page_pattern(1500)}
    full, _ = _pair(tmp_path, "full", pages)
    file_store.push(str(full), "s")
    snap = file_store.get_snapshot("s")
    source = StoreSource(file_store, snap)
    try:
        source.start_prefetch(snap.prefetch)
        # the first block (tables and target) comes in whole, checked against its address
        assert source.read(9 * PAGE, PAGE) == page_pattern(9)
    finally:
        source.close()  # waits for the fetch threads (their cache writes come last)
    first = next(r for r in snap.chunks if r.offset <= 9 * PAGE < r.offset + r.length)
    cached = file_store.cache.get(first.address)
    assert cached is not None
    decoded = decode_chunk(cached, first.length)
    assert decoded is not None and address_of(decoded) == first.address
    # the block at page 1500 was not asked for: not fetched, not cached
    far = next(r for r in snap.chunks if r.offset <= 1500 * PAGE < r.offset + r.length)
    assert far.address != first.address and file_store.cache.get(far.address) is None
