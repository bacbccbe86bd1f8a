"""Capture a running guest, restore it into a fresh VM, and check it carries on."""

from __future__ import annotations

import ctypes
from pathlib import Path

import attrs
import numpy as np
import pytest

from squibd.kvm import _abi, build_guest, progress_addr
from squibd.kvm.vcpu import Vcpu
from squibd.snapshot.models import X86VcpuState
from squibd.vm.memory import GuestMemory

from ._harness import Machine, copy_memory

pytestmark = pytest.mark.kvm

#: IA32_TSC (Intel SDM vol. 4): advances between two reads, so never equal.
MSR_IA32_TSC = 0x10
#: Offset of XMM0 in the legacy XSAVE area (Intel SDM vol. 1, 13.4.1).
XSAVE_XMM0_OFFSET = 160
XMM_MARK = bytes(range(0x40, 0x50))
#: XSAVE header: XSTATE_BV at byte 512; bit 1 = SSE state present.
XSTATE_BV_OFFSET = 512
XSTATE_SSE = 1 << 1


def _comparable(state: X86VcpuState) -> X86VcpuState:
    return attrs.evolve(state, msrs=tuple(m for m in state.msrs if m.index != MSR_IA32_TSC))


def _restore_into_fresh_vm(source: Machine) -> tuple[Machine, list[X86VcpuState]]:
    vm_state, vcpu_states = source.capture()
    target = Machine.build(len(vcpu_states), memory=copy_memory(source.memory))
    target.image = source.image
    target.vm.restore_vm_state(vm_state)
    for vcpu, state in zip(target.vcpus, vcpu_states, strict=True):
        vcpu.restore(state)
    return target, vcpu_states


def _mark_xmm0(vcpu: Vcpu) -> None:
    area = ctypes.create_string_buffer(vcpu.xsave_size)
    _abi.ioctl_raw(vcpu.fd, _abi.KVM_GET_XSAVE2, ctypes.addressof(area))
    data = bytearray(area.raw)
    data[XSAVE_XMM0_OFFSET : XSAVE_XMM0_OFFSET + len(XMM_MARK)] = XMM_MARK
    data[XSTATE_BV_OFFSET] |= XSTATE_SSE
    area = ctypes.create_string_buffer(bytes(data), vcpu.xsave_size)
    result, err = _abi.ioctl_raw(vcpu.fd, _abi.KVM_SET_XSAVE, ctypes.addressof(area))
    assert result == 0, err


def test_restored_counters_continue_beyond_saved_values() -> None:
    source = Machine.with_program("counter", 2)
    try:
        source.start()
        source.wait_progress_above([0, 0])
        source.pause()
        saved = source.progress()
        target, states = _restore_into_fresh_vm(source)
    finally:
        source.close()
    try:
        # Before it runs: memory and registers are the saved ones.
        assert target.progress() == saved
        for vcpu, state in zip(target.vcpus, states, strict=True):
            assert vcpu.get_regs() == state.regs
            assert vcpu.get_sregs() == state.sregs
        target.start()
        after = target.wait_progress_above(saved)
        later = target.wait_progress_above(after)
        assert all(b > a for a, b in zip(after, later, strict=True))
        assert target.errors == {}
    finally:
        target.close()


def test_restored_vcpu_state_reads_back_equal_to_the_capture() -> None:
    source = Machine.with_program("counter", 2)
    try:
        _mark_xmm0(source.vcpus[1])
        source.start()
        source.wait_progress_above([0, 0])
        source.pause()
        target, states = _restore_into_fresh_vm(source)
    finally:
        source.close()
    try:
        for vcpu, state in zip(target.vcpus, states, strict=True):
            assert _comparable(vcpu.capture()) == _comparable(state)
        xmm0 = states[1].xsave[XSAVE_XMM0_OFFSET : XSAVE_XMM0_OFFSET + len(XMM_MARK)]
        assert xmm0 == XMM_MARK
        assert len(states[0].msrs) > 10
        assert states[1].mp_state == _abi.KVM_MP_STATE_RUNNABLE
    finally:
        target.close()


def test_vm_state_captures_clock_irqchips_and_pit_and_restores_the_clock() -> None:
    source = Machine.with_program("counter", 1)
    try:
        source.start()
        source.wait_progress_above([0])
        source.pause()
        vm_state = source.vm.capture_vm_state()
        target, _ = _restore_into_fresh_vm(source)
    finally:
        source.close()
    try:
        assert [c.chip_id for c in vm_state.irqchips] == [0, 1, 2]
        assert all(len(c.data) == _abi.KVM_IRQCHIP_DATA_SIZE for c in vm_state.irqchips)
        assert vm_state.pit is not None and len(vm_state.pit) == _abi.KVM_PIT_STATE2_SIZE
        assert vm_state.clock is not None
        restored = target.vm.capture_vm_state()
        assert restored.clock is not None
        assert restored.clock.clock >= vm_state.clock.clock  # continues, not from zero
        assert restored.irqchips == vm_state.irqchips
    finally:
        target.close()


def test_memwriter_restored_keeps_writing_where_it_stopped() -> None:
    source = Machine.with_program("memwriter", 2, {"working_set_mib": 1}, mem_mib=4)
    try:
        source.start()
        source.wait_progress_above([300, 300])
        source.pause()
        saved = source.progress()
        target, _ = _restore_into_fresh_vm(source)
    finally:
        source.close()
    try:
        target.start()
        target.wait_progress_above(saved)
        target.pause()
        assert target.errors == {}
        assert target.image is not None
        # vCPU i's last write holds its progress (or progress + 1 when paused
        # between the working-set store and the progress store).
        progress = target.progress()
        data = target.memory.read(0x100000, 1 << 20)
        for i, value in enumerate(progress):
            words = {
                int.from_bytes(data[off + 8 * i : off + 8 * i + 8], "little")
                for off in range(0, len(data), 4096)
            }
            assert value in words
            assert max(words) - value in (0, 1)
    finally:
        target.close()


def test_build_guest_layout_is_what_a_vcpu_starts_with() -> None:
    machine = Machine.build(1)
    try:
        image = build_guest(machine.memory, "counter", {}, 1)
        image.setup_vcpu(machine.vcpus[0])
        regs = machine.vcpus[0].get_regs()
        sregs = machine.vcpus[0].get_sregs()
        assert regs.rip == 0x10000
        assert regs.rdi == image.progress_addr(0)
        assert sregs.cs.dpl == 3 and sregs.cs.l == 1
        assert sregs.efer & (1 << 10)  # LMA
    finally:
        machine.close()


def test_restore_onto_a_private_file_mapping_runs_and_logs_dirty_pages(tmp_path: Path) -> None:
    source = Machine.with_program("counter", 2)
    try:
        source.start()
        source.wait_progress_above([0, 0])
        source.pause()
        saved = source.progress()
        vm_state, vcpu_states = source.capture()
        path = tmp_path / "guest.mem"
        with path.open("wb") as out:
            for region in source.memory.regions:
                out.write(region.view)
        regions = source.memory.manifest_regions()
        image = source.image
    finally:
        source.close()
    target = Machine.build(2, memory=GuestMemory.from_file(str(path), regions), log_dirty=True)
    try:
        target.image = image
        target.vm.restore_vm_state(vm_state)
        for vcpu, state in zip(target.vcpus, vcpu_states, strict=True):
            vcpu.restore(state)
        target.start()
        target.wait_progress_above(saved)
        target.pause()
        bits = np.unpackbits(target.vm.harvest_dirty_log(0).view(np.uint8), bitorder="little")
        dirty = {int(p) for p in np.flatnonzero(bits)}
        assert {progress_addr("counter", {}, i) // 4096 for i in range(2)} <= dirty
        # MAP_PRIVATE: the guest's writes never reach the file.
        on_disk = path.read_bytes()[progress_addr("counter", {}, 0) :][:8]
        assert on_disk == saved[0].to_bytes(8, "little")
    finally:
        target.close()
