"""KVM dirty rings on real guests: exact harvests and ring-full exits."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from squibd.kvm import DirtyRingInUse, Kvm
from squibd.kvm.vm import PAGE_SIZE

from ._harness import Machine

pytestmark = pytest.mark.kvm

#: The smallest ring KVM takes: one page of 16-byte entries (256 entries).
SMALL_RING_BYTES = PAGE_SIZE
ROOMY_RING_BYTES = 64 * 1024


@pytest.fixture(autouse=True)
def _needs_dirty_ring() -> None:
    with Kvm.open() as kvm:
        if not (kvm.has("KVM_CAP_DIRTY_LOG_RING") or kvm.has("KVM_CAP_DIRTY_LOG_RING_ACQ_REL")):
            pytest.skip("this host's KVM has no dirty ring")


def _pages(harvest: dict[int, npt.NDArray[np.uint64]], machine: Machine) -> set[int]:
    out: set[int] = set()
    for slot, words in harvest.items():
        first = machine.vm.slots[slot].guest_addr // PAGE_SIZE
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        out |= {first + int(p) for p in np.flatnonzero(bits)}
    return out


def _full_pass(machine: Machine, pages_per_pass: int) -> None:
    machine.resume()
    machine.wait_progress_above([p + pages_per_pass for p in machine.progress()])
    machine.pause()


@pytest.mark.parametrize(("ring_bytes", "ws_mib"), [(ROOMY_RING_BYTES, 1), (SMALL_RING_BYTES, 2)])
def test_ring_harvest_equals_the_pages_memwriter_wrote(ring_bytes: int, ws_mib: int) -> None:
    machine = Machine.with_program(
        "memwriter",
        2,
        {"working_set_mib": ws_mib},
        mem_mib=4,
        log_dirty=True,
        ring_bytes=ring_bytes,
    )
    try:
        assert machine.image is not None
        expected = set(machine.image.written_pages())
        machine.start()
        machine.wait_progress_above([0, 0])
        machine.pause()
        machine.vm.harvest_dirty_rings()  # setup-time pages
        for _ in range(2):
            _full_pass(machine, ws_mib * 256)
            assert _pages(machine.vm.harvest_dirty_rings(), machine) == expected
        if ring_bytes == SMALL_RING_BYTES:  # 512 pages per pass cannot fit in 256 entries
            assert sum(r.ring_full_exits for r in machine.runners) > 0
        assert machine.errors == {}
    finally:
        machine.close()


def test_bitmap_log_is_refused_on_a_ring_vm() -> None:
    machine = Machine.with_program("counter", 1, log_dirty=True, ring_bytes=ROOMY_RING_BYTES)
    try:
        with pytest.raises(DirtyRingInUse, match="dirty rings"):
            machine.vm.harvest_dirty_log(0)
    finally:
        machine.close()
