"""The Firecracker v1.13+ x86 memory layout: regions, the state-file record, save and load."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from squibd.snapshot.codec import decode_body, encode_body
from squibd.snapshot.describe import describe_snapshot
from squibd.snapshot.envelope import encode_state, read_state_file
from squibd.snapshot.manifest import MemoryRegion
from squibd.snapshot.models import X86MicrovmState
from squibd.vm.errors import PairMismatch
from squibd.vm.memory import (
    FC_MMIO32_GAP_START,
    FC_MMIO64_GAP_SIZE,
    FC_MMIO64_GAP_START,
    MMIO_GAP_START,
    MemoryLayoutError,
    firecracker_x86_layout,
    layout_name,
    layout_regions,
    x86_layout,
)
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime
from tests.snapshot._states import sample_x86_state
from tests.vm._helpers import wait_progress_beyond

GIB = 1 << 30
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def test_the_32_bit_gap_starts_at_3_gib_and_the_64_bit_gap_spans_256_to_512_gib() -> None:
    assert FC_MMIO32_GAP_START == 0xC000_0000
    assert (FC_MMIO64_GAP_START, FC_MMIO64_GAP_START + FC_MMIO64_GAP_SIZE) == (256 * GIB, 512 * GIB)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (64 * MIB, [(0, 64 * MIB)]),
        (3 * GIB, [(0, 3 * GIB)]),
        (3 * GIB + PAGE, [(0, 3 * GIB), (4 * GIB, PAGE)]),
        (255 * GIB, [(0, 3 * GIB), (4 * GIB, 252 * GIB)]),
        (256 * GIB, [(0, 3 * GIB), (4 * GIB, 252 * GIB), (512 * GIB, 1 * GIB)]),
    ],
)
def test_firecracker_layout_skips_both_gaps(size: int, expected: list[tuple[int, int]]) -> None:
    regions = firecracker_x86_layout(size)
    assert [(r.guest_addr, r.size) for r in regions] == expected
    offsets = [sum(r.size for r in regions[:i]) for i in range(len(regions))]
    assert [r.file_offset for r in regions] == offsets
    assert layout_regions("firecracker", size) == regions


def test_layouts_differ_only_above_3_gib() -> None:
    assert firecracker_x86_layout(3 * GIB) == x86_layout(3 * GIB)
    above = 3 * GIB + 64 * MIB
    assert x86_layout(above) == (MemoryRegion(0, above, 0),)  # squibd's gap is at 3.25 GiB
    assert above <= MMIO_GAP_START
    assert layout_name(firecracker_x86_layout(above)) == "firecracker"
    assert layout_name(x86_layout(above)) == "squibd"
    assert layout_name(x86_layout(64 * MIB)) == "squibd"


def test_unknown_layouts_and_sizes_are_refused() -> None:
    with pytest.raises(MemoryLayoutError, match="unknown memory layout 'qemu'"):
        layout_regions("qemu", 64 * MIB)
    with pytest.raises(MemoryLayoutError, match="multiple"):
        firecracker_x86_layout(PAGE + 1)
    with pytest.raises(MemoryLayoutError, match="neither"):
        layout_name((MemoryRegion(0, 4 * MIB, 0), MemoryRegion(0x1000_0000, 4 * MIB, 4 * MIB)))


def test_state_body_records_the_layout_and_older_bodies_default_to_squibd() -> None:
    import attrs

    state = sample_x86_state()
    fc = attrs.evolve(state, vm_info=attrs.evolve(state.vm_info, memory_layout="firecracker"))
    assert decode_body(encode_body(fc), X86MicrovmState).vm_info.memory_layout == "firecracker"
    plain = msgpack.unpackb(encode_body(state), raw=False)
    del plain["vm_info"]["memory_layout"]  # a body written before issue 14
    old = msgpack.packb(plain, use_bin_type=True)
    assert decode_body(old, X86MicrovmState).vm_info.memory_layout == "squibd"


@pytest.mark.kvm
async def test_save_with_the_firecracker_layout_loads_with_it(
    runtime: Runtime, tmp_path: Path
) -> None:
    mib = 3 * 1024 + 64  # above 3 GiB: the layouts differ
    vm = await runtime.create_vm("fcl", 1, mib, False, GuestSpec("counter"),
                                 memory_layout="firecracker")  # fmt: skip
    assert vm.memory.manifest_regions() == firecracker_x86_layout(mib * MIB)
    await runtime.start("fcl")
    await wait_progress_beyond(vm, [0])
    await runtime.pause("fcl")
    saved = vm.guest_progress()
    snap, mem = str(tmp_path / "fcl.snap"), str(tmp_path / "fcl.mem")
    await runtime.save("fcl", "Full", snap, mem)
    state = read_state_file(snap)
    assert state.vm_info.memory_layout == "firecracker"
    assert state.memory.regions == firecracker_x86_layout(mib * MIB)
    assert describe_snapshot(snap, memory_file=mem, verify="full").ok
    await runtime.destroy("fcl")

    loaded = await runtime.load("fcl", snap, MemBackend("File", mem))
    assert loaded.memory.manifest_regions() == firecracker_x86_layout(mib * MIB)
    assert loaded.memory_layout == "firecracker"
    assert loaded.guest_progress() == saved
    await runtime.resume("fcl")
    await wait_progress_beyond(loaded, saved)

    # The same save with squibd's layout records squibd's regions.
    other = await runtime.create_vm("sql", 1, mib, False, GuestSpec("counter"))
    assert other.memory_layout == "squibd"
    assert other.memory.manifest_regions() == x86_layout(mib * MIB)


@pytest.mark.kvm
async def test_load_refuses_a_state_whose_regions_break_its_recorded_layout(
    runtime: Runtime, tmp_path: Path
) -> None:
    import attrs

    mib = 3 * 1024 + 64
    vm = await runtime.create_vm("bad", 1, mib, False, GuestSpec("counter"),
                                 memory_layout="firecracker")  # fmt: skip
    snap, mem = tmp_path / "bad.snap", str(tmp_path / "bad.mem")
    await runtime.start("bad")
    await runtime.save("bad", "Full", str(snap), mem)
    await runtime.destroy("bad")
    state = read_state_file(snap)
    assert vm is not None and isinstance(state, X86MicrovmState)
    lying = attrs.evolve(state, vm_info=attrs.evolve(state.vm_info, memory_layout="squibd"))
    snap.write_bytes(encode_state(lying))
    with pytest.raises(PairMismatch, match="records memory layout 'squibd'"):
        await runtime.load("bad", str(snap), MemBackend("File", mem))
    assert runtime.list() == []
