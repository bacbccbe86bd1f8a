"""Builds real snapshot pairs (state file + memory file) for the lazy-restore tests.

The memory files are written here directly (pwrite of chosen extents, digests
from squibd.snapshot.digest, the pair xattr), so the page server can be tested
without a running VM; state files go through the real envelope encoder.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

from squibd.snapshot.digest import manifest_digests
from squibd.snapshot.envelope import encode_state
from squibd.snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    KIND_DIFF,
    KIND_FULL,
    Extent,
    MemoryManifest,
    MemoryRegion,
)
from squibd.snapshot.models import X86VcpuState
from squibd.uffd.source import PAIR_XATTR
from tests.snapshot._states import minimal_x86_state, minimal_x86_vcpu

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
#: Two regions with a guest-physical gap, like x86 RAM around the MMIO hole.
REGIONS = (MemoryRegion(0, 4 * MIB, 0), MemoryRegion(0x1000_0000, 4 * MIB, 4 * MIB))
MEM_SIZE = sum(r.size for r in REGIONS)
ALGORITHM = "xxh3-64"
#: A complete (for the compatibility check) x86 vCPU state with the given registers.
vcpu_state = minimal_x86_vcpu


def page_pattern(page: int, version: int = 0) -> bytes:
    """Recognisable content of one page: its number and a version, repeated."""
    return (page.to_bytes(4, "little") + version.to_bytes(4, "little")) * (PAGE // 8)


def write_memory(
    path: Path,
    pages: Mapping[int, bytes],
    *,
    kind: str = KIND_FULL,
    parent: str | None = None,
    regions: tuple[MemoryRegion, ...] = REGIONS,
) -> MemoryManifest:
    """Write ``pages`` (page index -> content) into a sparse file and return its manifest."""
    size = sum(r.size for r in regions)
    extents: list[Extent] = []
    with open(path, "wb") as out:
        out.truncate(size)
        for page in sorted(pages):
            out.seek(page * PAGE)
            out.write(pages[page])
            if extents and extents[-1].end == page * PAGE:
                extents[-1] = Extent(extents[-1].offset, extents[-1].length + PAGE)
            else:
                extents.append(Extent(page * PAGE, PAGE))
    data = path.read_bytes()
    digests = manifest_digests(
        lambda offset, length: data[offset : offset + length], extents, algorithm=ALGORITHM
    )
    pair_id = str(uuid.uuid4())
    with contextlib.suppress(OSError):
        os.setxattr(path, PAIR_XATTR, pair_id.encode())
    return MemoryManifest(
        page_size=PAGE,
        regions=regions,
        kind=kind if parent is None else KIND_DIFF,
        file_size=size,
        pair_id=pair_id,
        parent_pair_id=parent,
        extents=tuple(extents),
        digest_algorithm=ALGORITHM,
        chunk_size=DEFAULT_CHUNK_SIZE,
        digests=digests,
    )


def write_state(path: Path, manifest: MemoryManifest, vcpus: tuple[X86VcpuState, ...]) -> None:
    """Write a real state file holding ``manifest`` and ``vcpus``."""
    path.write_bytes(encode_state(minimal_x86_state(manifest, vcpus)))
