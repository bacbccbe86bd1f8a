"""Guest memory regions: memfd-backed shared maps, private file maps, anonymous maps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from squibd.snapshot.manifest import MemoryRegion
from squibd.vm.memory import (
    MMIO_GAP_END,
    MMIO_GAP_START,
    GuestAddressError,
    GuestMemory,
    MemoryLayoutError,
    x86_layout,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def test_layout_below_the_mmio_gap_is_one_region() -> None:
    assert x86_layout(256 * MIB) == (MemoryRegion(0, 256 * MIB, 0),)


def test_layout_splits_around_the_mmio_gap() -> None:
    size = 4 * 1024 * MIB
    low, high = x86_layout(size)
    assert low == MemoryRegion(0, MMIO_GAP_START, 0)
    assert high == MemoryRegion(MMIO_GAP_END, size - MMIO_GAP_START, MMIO_GAP_START)


def test_layout_rejects_unaligned_size() -> None:
    with pytest.raises(MemoryLayoutError):
        x86_layout(PAGE + 1)


def test_create_maps_memfds_that_start_as_holes() -> None:
    with GuestMemory.create(16) as memory:
        (region,) = memory.regions
        assert region.fd is not None
        assert memory.total_size == 16 * MIB
        with pytest.raises(OSError):  # no data anywhere yet: ENXIO
            os.lseek(region.fd, 0, os.SEEK_DATA)
        memory.write(3 * PAGE + 5, b"hello")
        assert os.lseek(region.fd, 0, os.SEEK_DATA) == 3 * PAGE
        assert os.pread(region.fd, 5, 3 * PAGE + 5) == b"hello"  # shared with the memfd
        assert memory.read(3 * PAGE + 5, 5) == b"hello"
        assert region.host_addr != 0


def test_create_large_memory_has_two_regions_in_file_order() -> None:
    with GuestMemory.create(4096) as memory:  # nothing is touched: no RAM is used
        assert [r.guest_addr for r in memory.regions] == [0, MMIO_GAP_END]
        assert memory.regions[1].file_offset == memory.regions[0].size
        memory.write(MMIO_GAP_END, b"high")
        assert memory.read(MMIO_GAP_END, 4) == b"high"
        with pytest.raises(GuestAddressError):
            memory.read(MMIO_GAP_START, 1)  # the gap is not RAM


def test_access_across_region_end_is_refused() -> None:
    with GuestMemory.create(1) as memory, pytest.raises(GuestAddressError):
        memory.write(MIB - 2, b"abcd")


def test_from_file_is_copy_on_write(tmp_path: Path) -> None:
    path = tmp_path / "vm.mem"
    data = bytes(range(256)) * (2 * MIB // 256)
    path.write_bytes(data)
    regions = (MemoryRegion(0, 2 * MIB, 0),)
    with GuestMemory.from_file(str(path), regions) as memory:
        assert memory.regions[0].fd is None
        assert memory.read(1000, 10) == data[1000:1010]
        memory.write(1000, b"X" * 10)
        assert memory.read(1000, 10) == b"X" * 10
    assert path.read_bytes() == data  # private mapping: the file is untouched


def test_from_file_rejects_wrong_size(tmp_path: Path) -> None:
    path = tmp_path / "vm.mem"
    path.write_bytes(b"\0" * PAGE)
    with pytest.raises(MemoryLayoutError, match="regions need"):
        GuestMemory.from_file(str(path), (MemoryRegion(0, 2 * PAGE, 0),))


def test_from_file_maps_second_region_at_its_file_offset(tmp_path: Path) -> None:
    path = tmp_path / "vm.mem"
    path.write_bytes(b"a" * PAGE + b"b" * PAGE)
    regions = (MemoryRegion(0, PAGE, 0), MemoryRegion(MMIO_GAP_END, PAGE, PAGE))
    with GuestMemory.from_file(str(path), regions) as memory:
        assert memory.read(MMIO_GAP_END, 2) == b"bb"
        assert memory.manifest_regions() == regions


def test_anonymous_memory_reads_zero_and_is_writable() -> None:
    regions = (MemoryRegion(0, 4 * PAGE, 0),)
    with GuestMemory.anonymous(regions) as memory:
        assert memory.regions[0].fd is None
        assert memory.read(0, 4 * PAGE) == bytes(4 * PAGE)
        memory.write(PAGE, b"z")
        assert memory.read(PAGE, 1) == b"z"


@pytest.mark.parametrize(
    "regions",
    [
        (),
        (MemoryRegion(0, PAGE + 1, 0),),
        (MemoryRegion(0, PAGE, PAGE),),
        (MemoryRegion(0, 2 * PAGE, 0), MemoryRegion(PAGE, PAGE, 2 * PAGE)),
    ],
    ids=["empty", "unaligned", "file-gap", "overlap"],
)
def test_bad_layouts_are_refused(regions: tuple[MemoryRegion, ...]) -> None:
    with pytest.raises(MemoryLayoutError):
        GuestMemory.anonymous(regions)


def test_close_is_idempotent_and_closes_memfds() -> None:
    memory = GuestMemory.create(1)
    fd = memory.regions[0].fd
    assert fd is not None
    memory.close()
    memory.close()
    with pytest.raises(OSError):
        os.fstat(fd)
