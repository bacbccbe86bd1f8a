"""KVM dirty log on real guests: exact harvests, manual protect, toggling."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.kvm import DirtyLogNotEnabled
from squibd.kvm.vm import PAGE_SIZE

from ._harness import Machine

pytestmark = pytest.mark.kvm

GUEST_PAGE = 4096


def _pages(words: npt.NDArray[np.uint64]) -> set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return {int(p) for p in np.flatnonzero(bits)}


def _harvest(machine: Machine) -> set[int]:
    """Dirty guest page numbers over every slot."""
    pages: set[int] = set()
    for slot, info in machine.vm.slots.items():
        first = info.guest_addr // PAGE_SIZE
        pages |= {first + p for p in _pages(machine.vm.harvest_dirty_log(slot))}
    return pages


def _full_pass(machine: Machine, pages_per_pass: int) -> None:
    """Run until every vCPU has written more than one full pass of its working set."""
    machine.resume()
    machine.wait_progress_above([p + pages_per_pass for p in machine.progress()])
    machine.pause()


@settings(max_examples=6, deadline=None)
@given(
    ws_mib=st.integers(min_value=1, max_value=3),
    stride=st.integers(min_value=1, max_value=70),
    vcpus=st.integers(min_value=1, max_value=2),
)
def test_memwriter_harvest_equals_the_pages_it_wrote(ws_mib: int, stride: int, vcpus: int) -> None:
    assert PAGE_SIZE == GUEST_PAGE
    machine = Machine.with_program(
        "memwriter",
        vcpus,
        {"working_set_mib": ws_mib, "stride_pages": stride},
        mem_mib=4,
        log_dirty=True,
    )
    try:
        assert machine.vm.manual_dirty_protect == (
            machine.kvm.capabilities["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"] > 0
        )
        assert machine.image is not None
        expected = set(machine.image.written_pages())
        pages_per_pass = (ws_mib * 256 + stride - 1) // stride
        machine.start()
        machine.wait_progress_above([0] * vcpus)
        machine.pause()
        _harvest(machine)  # the first interval also holds setup-time pages
        for _ in range(3):
            _full_pass(machine, pages_per_pass)
            assert _harvest(machine) == expected
    finally:
        machine.close()


def test_second_harvest_while_paused_is_empty() -> None:
    machine = Machine.with_program("counter", 2, log_dirty=True)
    try:
        machine.start()
        machine.wait_progress_above([0, 0])
        machine.pause()
        first = _harvest(machine)
        assert machine.image is not None
        assert set(machine.image.written_pages()) <= first
        assert _harvest(machine) == set()
    finally:
        machine.close()


def test_host_writes_are_not_in_the_kvm_log() -> None:
    machine = Machine.with_program("counter", 1, log_dirty=True)
    try:
        _harvest(machine)
        machine.memory.write(0x200000, b"host")
        assert 0x200000 // GUEST_PAGE not in _harvest(machine)
    finally:
        machine.close()


def test_dirty_logging_can_be_turned_off_and_on_for_a_slot() -> None:
    machine = Machine.with_program("counter", 1, log_dirty=False)
    try:
        with pytest.raises(DirtyLogNotEnabled, match="slot 0"):
            machine.vm.harvest_dirty_log(0)
        machine.start()
        machine.wait_progress_above([0])
        machine.pause()
        machine.vm.set_dirty_logging(0, True)
        assert _harvest(machine) == set()  # nothing written since logging started
        machine.resume()
        machine.wait_progress_above(machine.progress())
        machine.pause()
        assert machine.image is not None
        assert set(machine.image.written_pages()) <= _harvest(machine)
        machine.vm.set_dirty_logging(0, False)
        with pytest.raises(DirtyLogNotEnabled):
            machine.vm.harvest_dirty_log(0)
        machine.resume()
        machine.wait_progress_above(machine.progress())  # still runs
    finally:
        machine.close()
