"""Guest memory: regions owned by squibd, mapped into this process.

Theory of operation
-------------------
A VM's RAM is a tuple of :class:`GuestRegion`, each a host mapping with a
guest-physical address and an offset in the memory file (regions are
concatenated in guest-physical order, the layout Firecracker uses). Three
backings exist:

- :meth:`GuestMemory.create`: one memfd per region, mapped ``MAP_SHARED``.
  KVM and an attached VMM can map the same fds; the memory writer can
  probe touched extents with ``SEEK_DATA``/``SEEK_HOLE`` and ``sendfile``
  from them.
- :meth:`GuestMemory.from_file`: a restore from a memory file, mapped
  ``MAP_PRIVATE | MAP_NORESERVE`` (copy-on-write, lazily faulted). ``fd`` is
  None: the file is not ours to write and does not reflect guest writes.
- :meth:`GuestMemory.anonymous`: ``MAP_PRIVATE | MAP_ANONYMOUS |
  MAP_NORESERVE`` for a lazy (userfaultfd) restore; ``fd`` is None.

Every region is host-page aligned. This module knows nothing of KVM.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from squibd.snapshot.manifest import MemoryRegion

__all__ = [
    "DEFAULT_MEMORY_LAYOUT",
    "FC_MMIO32_GAP_SIZE",
    "FC_MMIO32_GAP_START",
    "FC_MMIO64_GAP_SIZE",
    "FC_MMIO64_GAP_START",
    "MEMORY_LAYOUTS",
    "MMIO_GAP_END",
    "MMIO_GAP_START",
    "GuestAddressError",
    "GuestMemory",
    "GuestRegion",
    "MemoryLayoutError",
    "firecracker_x86_layout",
    "layout_name",
    "layout_regions",
    "x86_layout",
]

MIB: Final = 1024 * 1024
#: x86_64 32-bit MMIO hole, as Firecracker lays it out (arch/x86_64/layout.rs:
#: MMIO_MEM_START = 0xd000_0000 (3.25 GiB) up to the 4 GiB boundary).
MMIO_GAP_START: Final = 0xD000_0000
MMIO_GAP_END: Final = 0x1_0000_0000
#: Firecracker v1.13+ x86_64 (src/vmm/src/arch/x86_64/layout.rs): MMIO32_MEM_SIZE is
#: 1 GiB and ends at the 4 GiB boundary, so the 32-bit gap starts at 0xC000_0000 (3 GiB).
FC_MMIO32_GAP_START: Final = 0xC000_0000
FC_MMIO32_GAP_SIZE: Final = 1 << 30
#: The same file's 64-bit gap: MMIO64_MEM_START = 256 GiB, MMIO64_MEM_SIZE = 256 GiB.
FC_MMIO64_GAP_START: Final = 256 << 30
FC_MMIO64_GAP_SIZE: Final = 256 << 30
#: ``vm.create``'s ``memory_layout`` values: squibd's own (the 0xD000_0000 gap of
#: Firecracker up to v1.12) and Firecracker v1.13+'s.
MEMORY_LAYOUTS: Final = ("squibd", "firecracker")
DEFAULT_MEMORY_LAYOUT: Final = "squibd"

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
_PROT_RW: Final = mmap.PROT_READ | mmap.PROT_WRITE
#: MAP_NORESERVE from asm-generic/mman.h (x86_64 and arm64); older Pythons lack the name.
_MAP_NORESERVE: Final[int] = getattr(mmap, "MAP_NORESERVE", 0x4000)


class MemoryLayoutError(ValueError):
    """A region layout is unusable (unaligned, overlapping, empty, or not matching a file)."""


class GuestAddressError(ValueError):
    """A guest-physical access falls outside every region or spans two of them."""


def x86_layout(mem_size: int) -> tuple[MemoryRegion, ...]:
    """The x86_64 RAM regions for ``mem_size`` bytes: split around the 32-bit MMIO gap.

    Raises:
        MemoryLayoutError: ``mem_size`` is not a positive multiple of the host page.
    """
    _check_size(mem_size)
    low = min(mem_size, MMIO_GAP_START)
    regions = [MemoryRegion(guest_addr=0, size=low, file_offset=0)]
    if mem_size > low:
        regions.append(MemoryRegion(guest_addr=MMIO_GAP_END, size=mem_size - low, file_offset=low))
    return tuple(regions)


def firecracker_x86_layout(mem_size: int) -> tuple[MemoryRegion, ...]:
    """Firecracker v1.13+'s x86_64 RAM regions for ``mem_size`` bytes.

    RAM fills guest-physical space from 0 and skips two gaps: the 32-bit one
    (:data:`FC_MMIO32_GAP_START`, 1 GiB, up to 4 GiB) and the 64-bit one
    (:data:`FC_MMIO64_GAP_START`, 256 GiB long). Up to three regions result.

    Raises:
        MemoryLayoutError: ``mem_size`` is not a positive multiple of the host page.
    """
    _check_size(mem_size)
    gaps = (
        (FC_MMIO32_GAP_START, FC_MMIO32_GAP_SIZE),
        (FC_MMIO64_GAP_START, FC_MMIO64_GAP_SIZE),
    )
    regions: list[MemoryRegion] = []
    start = 0
    remaining = mem_size
    for gap_start, gap_size in gaps:
        size = min(remaining, gap_start - start)
        regions.append(MemoryRegion(guest_addr=start, size=size, file_offset=mem_size - remaining))
        remaining -= size
        start = gap_start + gap_size
        if remaining == 0:
            return tuple(regions)
    regions.append(MemoryRegion(guest_addr=start, size=remaining, file_offset=mem_size - remaining))
    return tuple(regions)


def layout_regions(layout: str, mem_size: int) -> tuple[MemoryRegion, ...]:
    """The RAM regions of the named layout (one of :data:`MEMORY_LAYOUTS`).

    Raises:
        MemoryLayoutError: unknown layout, or a size that is not whole host pages.
    """
    if layout == "squibd":
        return x86_layout(mem_size)
    if layout == "firecracker":
        return firecracker_x86_layout(mem_size)
    known = ", ".join(MEMORY_LAYOUTS)
    raise MemoryLayoutError(f"unknown memory layout {layout!r} (known: {known})")


def layout_name(regions: Sequence[MemoryRegion]) -> str:
    """The name of the layout ``regions`` follow.

    Guests up to 3 GiB have one region at 0 in both layouts: those are
    reported as the default, ``"squibd"``.

    Raises:
        MemoryLayoutError: the regions follow neither layout.
    """
    total = sum(region.size for region in regions)
    for name in MEMORY_LAYOUTS:
        if total > 0 and total % _PAGE_SIZE == 0 and tuple(regions) == layout_regions(name, total):
            return name
    raise MemoryLayoutError(
        "the memory regions follow neither the squibd nor the firecracker layout"
    )


def _check_size(mem_size: int) -> None:
    if mem_size <= 0 or mem_size % _PAGE_SIZE:
        raise MemoryLayoutError(
            f"memory size {mem_size} is not a positive multiple of the {_PAGE_SIZE}-byte page"
        )


def _check_layout(regions: Sequence[MemoryRegion]) -> None:
    if not regions:
        raise MemoryLayoutError("guest memory needs at least one region")
    expected_offset = 0
    previous_end = 0
    for index, region in enumerate(regions):
        for name in ("guest_addr", "size", "file_offset"):
            value = getattr(region, name)
            if value < 0 or value % _PAGE_SIZE:
                raise MemoryLayoutError(
                    f"region {index}: {name} {value:#x} is not a multiple of the "
                    f"{_PAGE_SIZE}-byte host page"
                )
        if region.size == 0:
            raise MemoryLayoutError(f"region {index} is empty")
        if region.guest_addr < previous_end:
            raise MemoryLayoutError(
                f"region {index} at {region.guest_addr:#x} overlaps or precedes the previous one"
            )
        if region.file_offset != expected_offset:
            raise MemoryLayoutError(
                f"region {index}: file offset {region.file_offset:#x}, expected "
                f"{expected_offset:#x} (regions are concatenated in guest-physical order)"
            )
        expected_offset += region.size
        previous_end = region.guest_addr + region.size


def _mapping_address(mapping: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(mapping)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # drop the buffer export so that the mapping can be closed


@attrs.define(eq=False)
class GuestRegion:
    """One mapped region of guest RAM.

    Attributes:
        guest_addr: guest-physical start address.
        size: length in bytes (a multiple of the host page).
        file_offset: where this region starts in the memory file.
        host_addr: address of the mapping in this process (for KVM slots).
        view: a writable memoryview of the whole mapping.
        fd: the memfd holding exactly this region, or None for private
            file mappings and anonymous (userfaultfd) mappings.
    """

    guest_addr: int
    size: int
    file_offset: int
    host_addr: int
    view: memoryview
    fd: int | None
    _mapping: mmap.mmap = attrs.field(repr=False)
    _closed: bool = attrs.field(default=False, init=False, repr=False)

    @property
    def guest_end(self) -> int:
        """First guest-physical address past this region."""
        return self.guest_addr + self.size

    def manifest_region(self) -> MemoryRegion:
        """This region as the manifest records it."""
        return MemoryRegion(self.guest_addr, self.size, self.file_offset)

    def close(self) -> None:
        """Unmap the region and close its memfd (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.view.release()
        # Someone may still hold a slice of the mapping (e.g. a traceback frame):
        # then it is unmapped when the last slice goes away.
        with contextlib.suppress(BufferError):
            self._mapping.close()
        if self.fd is not None:
            os.close(self.fd)


@attrs.define(eq=False)
class GuestMemory:
    """The RAM of one VM: regions in guest-physical order (see the module doc)."""

    regions: tuple[GuestRegion, ...]

    @classmethod
    def create(
        cls,
        mem_size_mib: int,
        *,
        name: str = "squibd-guest",
        layout: str = DEFAULT_MEMORY_LAYOUT,
    ) -> GuestMemory:
        """Fresh zeroed RAM of ``mem_size_mib`` MiB in the named x86 layout (see :meth:`shared`)."""
        return cls.shared(layout_regions(layout, mem_size_mib * MIB), name=name)

    @classmethod
    def shared(cls, regions: Sequence[MemoryRegion], *, name: str = "squibd-guest") -> GuestMemory:
        """Fresh zeroed RAM in ``regions``: one memfd per region, mapped ``MAP_SHARED``.

        Nothing is allocated until touched; untouched ranges stay holes of the memfd.

        Raises:
            MemoryLayoutError: the layout is invalid.
        """
        _check_layout(regions)

        def map_one(region: MemoryRegion) -> GuestRegion:
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                os.ftruncate(fd, region.size)
                mapping = mmap.mmap(fd, region.size, flags=mmap.MAP_SHARED, prot=_PROT_RW)
            except BaseException:
                os.close(fd)
                raise
            return cls._region(region, mapping, fd)

        return cls._map_each(regions, map_one)

    @classmethod
    def from_file(cls, path: str, regions: Sequence[MemoryRegion]) -> GuestMemory:
        """Map a memory file copy-on-write (``MAP_PRIVATE | MAP_NORESERVE``), lazily.

        Raises:
            MemoryLayoutError: the layout is invalid or the file's size differs from it.
            OSError: the file cannot be opened or mapped.
        """
        _check_layout(regions)
        total = sum(region.size for region in regions)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

        def map_one(region: MemoryRegion) -> GuestRegion:
            mapping = mmap.mmap(
                fd,
                region.size,
                flags=mmap.MAP_PRIVATE | _MAP_NORESERVE,
                prot=_PROT_RW,
                offset=region.file_offset,
            )
            return cls._region(region, mapping, None)

        try:
            size = os.fstat(fd).st_size
            if size != total:
                raise MemoryLayoutError(
                    f"memory file {path!r} is {size} bytes, the regions need {total}"
                )
            return cls._map_each(regions, map_one)
        finally:
            os.close(fd)  # the mappings keep the file referenced

    @classmethod
    def anonymous(cls, regions: Sequence[MemoryRegion]) -> GuestMemory:
        """Anonymous private RAM (``MAP_NORESERVE``), for a userfaultfd lazy restore."""
        _check_layout(regions)

        def map_one(region: MemoryRegion) -> GuestRegion:
            mapping = mmap.mmap(
                -1,
                region.size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                prot=_PROT_RW,
            )
            return cls._region(region, mapping, None)

        return cls._map_each(regions, map_one)

    @classmethod
    def _map_each(
        cls, regions: Sequence[MemoryRegion], map_one: Callable[[MemoryRegion], GuestRegion]
    ) -> GuestMemory:
        # Map every region in order; a failure unmaps (and closes) those already mapped.
        built: list[GuestRegion] = []
        try:
            for region in regions:
                built.append(map_one(region))
        except BaseException:
            for done in built:
                done.close()
            raise
        return cls(tuple(built))

    @staticmethod
    def _region(region: MemoryRegion, mapping: mmap.mmap, fd: int | None) -> GuestRegion:
        return GuestRegion(
            guest_addr=region.guest_addr,
            size=region.size,
            file_offset=region.file_offset,
            host_addr=_mapping_address(mapping),
            view=memoryview(mapping),
            fd=fd,
            mapping=mapping,
        )

    @property
    def total_size(self) -> int:
        """Bytes of RAM, which is also the memory file's size."""
        return sum(region.size for region in self.regions)

    def manifest_regions(self) -> tuple[MemoryRegion, ...]:
        """The layout as the manifest records it."""
        return tuple(region.manifest_region() for region in self.regions)

    def region_at(self, guest_addr: int, length: int = 1) -> GuestRegion:
        """The region holding ``[guest_addr, guest_addr + length)``.

        Raises:
            GuestAddressError: no single region holds the whole range.
        """
        if length < 0:
            raise GuestAddressError(f"negative length {length}")
        for region in self.regions:
            if region.guest_addr <= guest_addr and guest_addr + length <= region.guest_end:
                return region
        raise GuestAddressError(
            f"guest range [{guest_addr:#x}, {guest_addr + length:#x}) is not inside one region"
        )

    def read(self, guest_addr: int, length: int) -> bytes:
        """Copy ``length`` bytes of guest RAM at ``guest_addr``."""
        region = self.region_at(guest_addr, length)
        start = guest_addr - region.guest_addr
        return bytes(region.view[start : start + length])

    def write(self, guest_addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` into guest RAM at ``guest_addr`` (callers mark it dirty)."""
        length = len(data)
        region = self.region_at(guest_addr, length)
        start = guest_addr - region.guest_addr
        region.view[start : start + length] = data

    def close(self) -> None:
        """Unmap every region and close the memfds (idempotent)."""
        for region in self.regions:
            region.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
