"""write_memory / build_manifest: sparse Full, exact Diff (I-SNAP-2), writers, errors."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from squibd.snapshot import memwriter
from squibd.snapshot.bitmap import HOST_PAGE_SIZE, DirtyBitmap
from squibd.snapshot.errors import MemoryIo
from squibd.snapshot.manifest import Extent, MemoryRegion, iter_chunks
from squibd.snapshot.memerrors import MemoryInputInvalid
from squibd.snapshot.memwriter import (
    WRITE_METHODS,
    WriteCancelled,
    build_manifest,
    new_pair_id,
    read_pair_xattr,
    set_pair_xattr,
    write_memory,
)
from squibd.vm.memory import GuestMemory
from tests.snapshot.memfiles import assert_holes_match, assert_same_content, small_tmpfs

PAGE = HOST_PAGE_SIZE
MIB = 1024 * 1024
# Three regions, the middle one not chunk-aligned in the file, to exercise region edges.
LAYOUT = (
    MemoryRegion(0, 3 * MIB, 0),
    MemoryRegion(0x1000_0000, 64 * PAGE, 3 * MIB),
    MemoryRegion(0x2000_0000, 2 * MIB + 8 * PAGE, 3 * MIB + 64 * PAGE),
)
TOTAL = sum(r.size for r in LAYOUT)


@contextlib.contextmanager
def out_file(directory: str | Path) -> Iterator[tuple[int, str]]:
    fd, path = tempfile.mkstemp(dir=directory, suffix=".mem")
    try:
        yield fd, path
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _page_content(seed: int) -> bytes:
    return (seed.to_bytes(8, "little") + b"\x5a" * 8) * (PAGE // 16)


def _file_page(region_index: int, page: int) -> int:
    return LAYOUT[region_index].file_offset + page * PAGE


def _check_digests(path: str, extents: tuple[Extent, ...], digests: bytes) -> None:
    with open(path, "rb") as f:
        data = f.read()
    chunks = list(iter_chunks(extents, 2 * MIB))
    assert len(digests) == 8 * len(chunks)
    for index, chunk in enumerate(chunks):
        expected = xxhash.xxh3_64_digest(data[chunk.offset : chunk.end])
        assert digests[8 * index : 8 * index + 8] == expected


page_sets = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 10_000)), min_size=0, max_size=60
)


@pytest.mark.parametrize("fs_dir", ["tmp_path", "/dev/shm"], ids=["ext4", "tmpfs"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(picks=page_sets, clustered=st.booleans())
def test_diff_holds_exactly_the_dirty_pages(
    fs_dir: str, tmp_path: Path, picks: list[tuple[int, int]], clustered: bool
) -> None:
    """I-SNAP-2: the Diff file holds exactly the dirty pages' bytes, holes elsewhere."""
    directory = tmp_path if fs_dir == "tmp_path" else Path(fs_dir)
    dirty: list[set[int]] = [set(), set(), set()]
    for region_index, raw in picks:
        npages = LAYOUT[region_index].size // PAGE
        page = raw % npages
        if raw % 5 == 0:  # edges of regions
            page = 0 if raw % 2 else npages - 1
        span = 1 + (raw % 7 if clustered else 0)
        dirty[region_index].update(range(page, min(npages, page + span)))
    with GuestMemory.shared(LAYOUT) as memory, out_file(directory) as (fd, path):
        for region in memory.regions:  # every page holds distinct non-zero data
            for page in range(region.size // PAGE):
                region.view[page * PAGE : (page + 1) * PAGE] = _page_content(
                    region.file_offset // PAGE + page + 1
                )
        runs = [[(p, 1) for p in sorted(pages)] for pages in dirty]
        result = write_memory(fd, memory.regions, kind="Diff", runs_per_region=runs, writers=2)
        assert os.fstat(fd).st_size == TOTAL
        expected_extents = [
            Extent(_file_page(i, p), PAGE) for i, pages in enumerate(dirty) for p in pages
        ]
        assert_holes_match(path, expected_extents)
        assert_holes_match(path, result.extents)
        assert result.pages_written == sum(len(p) for p in dirty)
        with open(path, "rb") as f:
            for index, pages in enumerate(dirty):
                for page in range(LAYOUT[index].size // PAGE):
                    f.seek(_file_page(index, page))
                    got = f.read(PAGE)
                    if page in pages:
                        assert got == _page_content(_file_page(index, page) // PAGE + 1)
                    else:
                        assert got == bytes(PAGE)
        _check_digests(path, result.extents, result.digests)


def test_full_of_partly_touched_memfd_leaves_untouched_ranges_as_holes(tmp_path: Path) -> None:
    with GuestMemory.shared(LAYOUT) as memory, out_file(tmp_path) as (fd, path):
        memory.regions[0].view[5 * PAGE : 7 * PAGE] = b"\x01" * 2 * PAGE
        memory.regions[0].view[3 * MIB - PAGE :] = b"\x02" * PAGE  # last page, region edge
        memory.regions[2].view[0:PAGE] = bytes(PAGE)  # touched with zeros: still data
        result = write_memory(fd, memory.regions, kind="Full")
        expected = [
            Extent(5 * PAGE, 2 * PAGE),
            Extent(3 * MIB - PAGE, PAGE),
            Extent(LAYOUT[2].file_offset, PAGE),
        ]
        assert list(result.extents) == expected
        assert_holes_match(path, expected)
        reference = tmp_path / "reference.mem"
        reference.write_bytes(b"".join(bytes(r.view) for r in memory.regions))
        assert_same_content(path, reference)
        _check_digests(path, result.extents, result.digests)


def test_full_of_private_file_mapping_writes_nonzero_pages(tmp_path: Path) -> None:
    source = tmp_path / "source.mem"
    data = bytearray(TOTAL)
    data[PAGE : 2 * PAGE] = b"a" * PAGE
    data[3 * MIB : 3 * MIB + 3 * PAGE] = b"b" * 3 * PAGE  # starts region 1
    source.write_bytes(data)
    with GuestMemory.from_file(str(source), LAYOUT) as memory, out_file(tmp_path) as (fd, path):
        memory.write(0x2000_0000 + 2 * MIB, b"c" * 10)  # a copy-on-write change, last chunk
        result = write_memory(fd, memory.regions, kind="Full", writers=2)
        data[LAYOUT[2].file_offset + 2 * MIB : LAYOUT[2].file_offset + 2 * MIB + 10] = b"c" * 10
        expected = [
            Extent(PAGE, PAGE),
            Extent(3 * MIB, 3 * PAGE),
            Extent(LAYOUT[2].file_offset + 2 * MIB, PAGE),
        ]
        assert list(result.extents) == expected
        assert_holes_match(path, expected)
        with open(path, "rb") as f:
            assert f.read() == bytes(data)


def test_full_of_anonymous_memory_with_nothing_written_is_all_hole(tmp_path: Path) -> None:
    with GuestMemory.anonymous(LAYOUT) as memory, out_file(tmp_path) as (fd, path):
        result = write_memory(fd, memory.regions, kind="Full")
        assert result.extents == () and result.digests == b""
        assert os.fstat(fd).st_size == TOTAL
        assert_holes_match(path, [])


def _fill_pattern(memory: GuestMemory) -> None:
    for index, region in enumerate(memory.regions):
        for page in range(0, region.size // PAGE, 3):
            region.view[page * PAGE : page * PAGE + 16] = bytes([index + 1]) * 16


@pytest.mark.parametrize("method", WRITE_METHODS)
def test_writer_counts_and_methods_give_identical_files_and_manifests(
    tmp_path: Path, method: str
) -> None:
    pair_id = new_pair_id()
    with GuestMemory.shared(LAYOUT) as memory:
        _fill_pattern(memory)
        outputs = []
        for writers in (1, 4):
            with out_file(tmp_path) as (fd, path):
                result = write_memory(
                    fd, memory.regions, kind="Full", writers=writers, method=method
                )
                manifest = build_manifest(
                    result, memory.regions, kind="Full", pair_id=pair_id, parent_pair_id=None
                )
                with open(path, "rb") as f:
                    outputs.append((f.read(), manifest))
        assert outputs[0] == outputs[1]
        assert outputs[0][1].regions == LAYOUT
        assert outputs[0][1].file_size == TOTAL


def test_progress_reports_monotonic_bytes_up_to_total(tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    with GuestMemory.shared(LAYOUT) as memory, out_file(tmp_path) as (fd, _):
        _fill_pattern(memory)
        result = write_memory(fd, memory.regions, kind="Full", writers=3,
                              progress=lambda done, total: seen.append((done, total)))
    assert seen, "progress was never reported"
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert seen[-1] == (result.bytes_written, result.bytes_written)


def test_cancel_event_stops_the_write(tmp_path: Path) -> None:
    cancel = threading.Event()
    cancel.set()
    with GuestMemory.shared(LAYOUT) as memory, out_file(tmp_path) as (fd, _):
        _fill_pattern(memory)
        with pytest.raises(WriteCancelled):
            write_memory(fd, memory.regions, kind="Full", cancel=cancel)


def test_cancel_set_during_the_write_stops_between_batches(tmp_path: Path) -> None:
    cancel = threading.Event()
    seen: list[int] = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        cancel.set()  # the operator cancels after the first batch

    with GuestMemory.shared(LAYOUT) as memory, out_file(tmp_path) as (fd, _):
        runs = [[(p, 1) for p in range(0, 768, 2)], [], []]  # 384 units: two batches
        with pytest.raises(WriteCancelled):
            write_memory(fd, memory.regions, kind="Diff", runs_per_region=runs, writers=1,
                         progress=progress, cancel=cancel)
    assert len(seen) == 1 and seen[0] < 384 * PAGE


@pytest.mark.parametrize(
    "runs",
    [
        [[(0, 1)], [(63, 2)], []],  # past the end of region 1
        [[(-1, 1)], [], []],
        [[(0, 0)], [], []],
        [[(0, 1)], []],  # one list short
    ],
    ids=["past-end", "negative", "empty-run", "missing-region"],
)
def test_runs_outside_the_regions_are_refused(tmp_path: Path, runs: list[list[tuple[int, int]]]
                                              ) -> None:
    with GuestMemory.shared(LAYOUT) as memory, out_file(tmp_path) as (fd, _):
        with pytest.raises(MemoryInputInvalid) as caught:
            write_memory(fd, memory.regions, kind="Diff", runs_per_region=runs)
        assert str(caught.value).startswith("memory file I/O error: Invalid argument (os error 22)")


def test_non_power_of_two_page_is_refused(tmp_path: Path) -> None:
    with (
        GuestMemory.shared(LAYOUT) as memory,
        out_file(tmp_path) as (fd, _),
        pytest.raises(MemoryInputInvalid, match="power of two"),
    ):
        write_memory(fd, memory.regions, kind="Full", page_size=3000)


def test_read_only_destination_fd_gives_memory_io(tmp_path: Path) -> None:
    path = tmp_path / "ro.mem"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    try:
        with GuestMemory.shared(LAYOUT) as memory:
            _fill_pattern(memory)
            with pytest.raises(MemoryIo) as caught:
                write_memory(fd, memory.regions, kind="Full")
    finally:
        os.close(fd)
    # ftruncate(2) of a read-only descriptor fails with EINVAL.
    assert str(caught.value) == "memory file I/O error: Invalid argument (os error 22)"


def test_injected_eio_fake_becomes_memory_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """A fake pwrite injects EIO (a real disk cannot be made to fail on demand here)."""

    def failing_pwrite(fd: int, data: object, offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(memwriter.os, "pwrite", failing_pwrite)
    with GuestMemory.shared(LAYOUT) as memory, out_file(tmp_path) as (fd, _):
        _fill_pattern(memory)
        with pytest.raises(MemoryIo) as caught:
            write_memory(fd, memory.regions, kind="Full", writers=2, method="pwrite")
    assert str(caught.value) == "memory file I/O error: Input/output error (os error 5)"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_enospc_on_a_small_tmpfs_is_memory_io(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "1m") as mountpoint, GuestMemory.shared(LAYOUT) as memory:
        _fill_pattern(memory)
        fd, path = tempfile.mkstemp(dir=mountpoint)
        try:
            with pytest.raises(MemoryIo) as caught:
                write_memory(fd, memory.regions, kind="Full", writers=2)
        finally:
            os.close(fd)
            os.unlink(path)
        assert str(caught.value) == "memory file I/O error: No space left on device (os error 28)"
        assert os.listdir(mountpoint) == []


def test_pair_xattr_round_trip(tmp_path: Path) -> None:
    with out_file(tmp_path) as (fd, path):
        pair_id = new_pair_id()
        assert set_pair_xattr(fd, pair_id)
        assert read_pair_xattr(path) == pair_id
    with out_file(tmp_path) as (_, path):
        assert read_pair_xattr(path) is None


def test_build_manifest_checks_parent() -> None:
    result = memwriter.WriteResult((), b"", 0, 0, PAGE, "xxh3-64", 2 * MIB)
    regions = (MemoryRegion(0, PAGE, 0),)
    with pytest.raises(MemoryInputInvalid):
        build_manifest(result, regions, kind="Diff", pair_id="p", parent_pair_id=None)
    with pytest.raises(MemoryInputInvalid):
        build_manifest(result, regions, kind="Full", pair_id="p", parent_pair_id="q")
    manifest = build_manifest(result, regions, kind="Diff", pair_id="p", parent_pair_id="q")
    assert manifest.parent_pair_id == "q" and manifest.kind == "Diff"


def test_runs_across_chunk_boundaries_are_cut_like_the_manifest(tmp_path: Path) -> None:
    """Digests follow manifest.iter_chunks even for overlapping, unsorted, chunk-crossing runs."""
    with GuestMemory.shared(LAYOUT) as memory, out_file(tmp_path) as (fd, path):
        _fill_pattern(memory)
        runs = [
            [(510, 4), (100, 600), (0, 1)],  # overlapping + unsorted; crosses the 2 MiB boundary
            [(0, 64)],  # the whole middle region, which is not chunk-aligned in the file
            [(185, 10), (194, 2), (519, 1)],  # crosses the 4 MiB file offset at page 192
        ]
        result = write_memory(fd, memory.regions, kind="Diff", runs_per_region=runs, writers=3)
        base2 = LAYOUT[2].file_offset
        assert list(result.extents) == [
            Extent(0, PAGE),
            Extent(100 * PAGE, 600 * PAGE),
            Extent(LAYOUT[1].file_offset, 64 * PAGE),
            Extent(base2 + 185 * PAGE, 11 * PAGE),
            Extent(base2 + 519 * PAGE, PAGE),  # the last page of the memory
        ]
        _check_digests(path, result.extents, result.digests)


def test_run_tables_and_run_lists_write_the_same_diff(tmp_path: Path) -> None:
    with GuestMemory.shared(LAYOUT) as memory:
        _fill_pattern(memory)
        bitmaps = [DirtyBitmap(region.size) for region in memory.regions]
        bitmaps[0].mark_pages(5, 600)
        bitmaps[2].mark_page_array([0, 1, 519])
        outputs = []
        for runs in ([b.snapshot_runs() for b in bitmaps],
                     [b.snapshot_run_table() for b in bitmaps]):
            with out_file(tmp_path) as (fd, path):
                result = write_memory(fd, memory.regions, kind="Diff", runs_per_region=runs)
                with open(path, "rb") as f:
                    outputs.append((f.read(), result))
    assert outputs[0] == outputs[1]
    assert outputs[0][1].pages_written == 603
