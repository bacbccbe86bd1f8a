"""vCPU threads on real KVM: run, pause, resume, stall, exit errors."""

from __future__ import annotations

import collections.abc
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.kvm import KvmUnsupported, Vcpu, VcpuLimitExceeded, guest, programs
from squibd.kvm._asm import Assembler

from ._harness import DEADLINE_S, Machine, runner_report, wait_for

pytestmark = pytest.mark.kvm


@pytest.fixture
def counter2() -> collections.abc.Iterator[Machine]:
    machine = Machine.with_program("counter", 2)
    try:
        yield machine
    finally:
        machine.close()


def test_counter_progresses_on_two_vcpus(counter2: Machine) -> None:
    assert counter2.progress() == [0, 0]
    counter2.start()
    first = counter2.wait_progress_above([0, 0])
    second = counter2.wait_progress_above(first)
    assert all(b > a for a, b in zip(first, second, strict=True))
    assert counter2.errors == {}


def test_counter_sends_heartbeats(counter2: Machine) -> None:
    counter2.start()
    wait_for(lambda: all(r.heartbeats >= 2 for r in counter2.runners), "two heartbeats each")
    assert counter2.progress()[0] >= 2 * programs.COUNTER_HEARTBEAT_INTERVAL


def test_paused_vcpus_do_not_progress_and_resume_continues(counter2: Machine) -> None:
    counter2.start()
    counter2.wait_progress_above([0, 0])
    counter2.pause()
    assert all(r.parked for r in counter2.runners)
    frozen = counter2.progress()
    counter2.capture()  # milliseconds of work while paused
    assert counter2.progress() == frozen
    counter2.resume()
    after = counter2.wait_progress_above(frozen)
    assert all(b > a for a, b in zip(frozen, after, strict=True))


def test_repeated_pause_resume_cycles_each_ack(counter2: Machine) -> None:
    counter2.start()
    for _ in range(20):
        counter2.pause()
        counter2.resume()
    counter2.pause()
    assert all(r.parked for r in counter2.runners)


def test_pause_of_a_runner_never_started_acks_at_once(counter2: Machine) -> None:
    counter2.make_runners()
    counter2.runners[0].request_pause()
    assert counter2.acks[0].is_set()


def test_resume_drops_an_unacked_pause_request(counter2: Machine) -> None:
    counter2.start()
    counter2.runners[0].arm_stall(kick=True)
    assert counter2.runners[0].wait_stalled(20)
    counter2.runners[0].request_pause()
    counter2.runners[0].resume()  # the request is dropped while the vCPU is stalled
    counter2.runners[0].release_stall()
    before = counter2.progress()
    after = counter2.wait_progress_above(before)
    assert after[0] > before[0]
    assert not counter2.acks[0].is_set()


def test_stalled_vcpu_does_not_ack_until_released(counter2: Machine) -> None:
    counter2.start()
    stalled = counter2.runners[1]
    stalled.arm_stall(kick=True)
    assert stalled.wait_stalled(20)
    counter2.runners[0].request_pause()
    stalled.request_pause()
    assert counter2.acks[0].wait(20)
    assert not counter2.acks[1].is_set()
    stalled.release_stall()
    assert counter2.acks[1].wait(20)


def test_guest_write_to_stall_port_blocks_while_armed(counter2: Machine) -> None:
    assert counter2.image is not None
    counter2.start()
    runner = counter2.runners[0]
    runner.arm_stall(kick=False)
    counter2.image.request_stall(counter2.memory, 0)
    assert runner.wait_stalled(20)
    # the guest cleared its control word before the OUT
    assert counter2.memory.read(counter2.image.control_addr(0), 8) == bytes(8)
    held = counter2.progress()[0]
    counter2.wait_progress_above([0, counter2.progress()[1]])  # the other vCPU runs on
    assert counter2.progress()[0] == held
    runner.release_stall()
    counter2.wait_progress_above([held, 0])


def _machine_with_code(code: bytes) -> Machine:
    machine = Machine.with_program("counter", 1)
    machine.memory.write(guest.CODE_ADDR, code)
    return machine


def test_triple_fault_is_an_error_naming_shutdown_and_pauses_still_ack() -> None:
    asm = Assembler()
    asm.ud2()  # no IDT: #UD -> #GP -> #DF -> triple fault
    machine = _machine_with_code(asm.assemble())
    try:
        machine.start()
        message = machine.wait_error(0)
        assert "KVM_EXIT_SHUTDOWN" in message
        assert machine.runners[0].error == message
        machine.pause()
        assert machine.runners[0].parked
    finally:
        machine.close()


def test_mmio_outside_guest_ram_is_an_error_naming_the_exit_and_address() -> None:
    # mov rax, 0xC0000000 (mapped by the page tables, no memory slot); mov [rax], rax
    code = bytes.fromhex("48b8") + (0xC000_0000).to_bytes(8, "little") + bytes.fromhex("488900")
    machine = _machine_with_code(code)
    try:
        machine.start()
        message = machine.wait_error(0)
        assert "KVM_EXIT_MMIO" in message
        assert "8-byte MMIO write at 0xc0000000" in message
    finally:
        machine.close()


def test_in_from_a_port_gets_the_io_handler_reply() -> None:
    # in al, dx (EC) with dx = 0x1234, then store al into the progress counter, then ud2.
    code = (
        bytes.fromhex("66ba3412")  # mov dx, 0x1234
        + bytes.fromhex("ec")  # in al, dx
        + bytes.fromhex("8807")  # mov [rdi], al
        + bytes.fromhex("0f0b")  # ud2 -> stop
    )
    machine = _machine_with_code(code)
    seen: list[tuple[int, int, bool]] = []

    def handler(port: int, size: int, is_write: bool, data: bytes) -> bytes | None:
        seen.append((port, size, is_write))
        return b"\x5a"

    try:
        machine.make_runners()
        machine.runners[0].io_handler = handler
        machine.start()
        machine.wait_error(0)
        assert seen == [(0x1234, 1, False)]
        assert struct.unpack("<Q", machine.memory.read(guest.PROGRESS_BASE, 8))[0] == 0x5A
    finally:
        machine.close()


def test_pause_during_an_in_exit_completes_the_in_before_parking() -> None:
    # KVM finishes an IN (data into AL, RIP past it) only at the next KVM_RUN:
    # a vCPU parked and captured straight after the exit would replay the IN.
    in_al_dx = bytes.fromhex("ec")
    code = bytes.fromhex("66ba3412") + in_al_dx + bytes.fromhex("ebfe")  # mov dx; in; jmp $
    machine = _machine_with_code(code)
    try:
        assert machine.image is not None
        entry = machine.image.regs[0].rip
        machine.make_runners()
        runner = machine.runners[0]

        def handler(port: int, size: int, is_write: bool, data: bytes) -> bytes | None:
            runner.request_pause()  # from the vCPU thread, while it handles the exit
            return b"\x5a"

        runner.io_handler = handler
        machine.start()
        assert machine.acks[0].wait(DEADLINE_S), runner_report(runner)
        regs = machine.vcpus[0].capture().regs
        assert regs.rip == entry + 4 + len(in_al_dx)  # at the jmp: the IN retired
        assert regs.rax & 0xFF == 0x5A
        assert machine.errors == {}
    finally:
        machine.close()


def test_vcpu_index_above_kvm_limit_is_a_clear_error() -> None:
    machine = Machine.build(1)
    try:
        with pytest.raises(VcpuLimitExceeded, match=str(machine.kvm.max_vcpus)):
            Vcpu.create(machine.vm, machine.kvm.max_vcpus)
    finally:
        machine.close()


def test_missing_capability_is_named_fault_injected_into_caps() -> None:
    machine = Machine.build(1)
    try:
        machine.kvm.capabilities["KVM_CAP_XCRS"] = 0  # what a host without it reports
        with pytest.raises(KvmUnsupported, match="KVM_CAP_XCRS"):
            machine.kvm.require_all()
    finally:
        machine.close()


def test_memwriter_with_a_write_rate_runs_its_rdtsc_path() -> None:
    machine = Machine.with_program(
        "memwriter", 1, {"working_set_mib": 1, "write_rate_pages_per_sec": 200_000}, mem_mib=4
    )
    try:
        assert machine.image is not None
        assert machine.image.regs[0].r13 > 0  # TSC ticks per write, from KVM's TSC rate
        machine.start()
        machine.wait_progress_above([500])
        assert machine.errors == {}
    finally:
        machine.close()


# Each example builds a 2-vCPU VM whose vCPUs spin; on a loaded 2-core host
# every wait here is exposed to starvation, so the example count stays small
# (a timeout names the runner's state: see _harness.runner_report).
@settings(max_examples=10, deadline=None)
@given(ops=st.lists(st.sampled_from(["pause", "resume", "pause_one", "stall_release"]), max_size=8))
def test_any_sequence_of_controls_ends_in_a_clean_pause(ops: list[str]) -> None:
    machine = Machine.with_program("counter", 2)
    try:
        machine.start()
        for op in ops:
            if op == "pause":
                machine.pause()
            elif op == "pause_one":
                machine.pause([1])
            elif op == "resume":
                machine.resume()
            else:  # a stall holds a running vCPU (a paused one is already held)
                machine.resume()
                machine.runners[0].arm_stall(kick=True)
                assert machine.runners[0].wait_stalled(DEADLINE_S), runner_report(
                    machine.runners[0]
                )
                machine.runners[0].release_stall()
        machine.resume()
        before = machine.progress()
        machine.wait_progress_above(before)
        machine.pause()
        frozen = machine.progress()
        machine.capture()
        assert machine.progress() == frozen
        assert machine.errors == {}
    finally:
        machine.close()


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (5, "KVM_EXIT_HLT"),
        (9, "KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest (reason 0x7"),
        (17, "KVM_EXIT_INTERNAL_ERROR: KVM could not emulate the guest (suberror 1"),
        (31, "KVM_EXIT_DIRTY_RING_FULL"),
        (99, "exit reason 99"),
    ],
)
def test_exit_messages_name_the_exit_injected_into_kvm_run(reason: int, expected: str) -> None:
    # The nested KVM here cannot be made to fail entry or emulation on demand:
    # the exit is written into the real (idle) vCPU's kvm_run instead.
    machine = Machine.with_program("counter", 1)
    try:
        machine.make_runners()
        run = machine.vcpus[0].run
        run.exit_reason = reason
        if reason == 9:
            run.exit.fail_entry.hardware_entry_failure_reason = 7
        else:  # the exit union: internal overlaps fail_entry
            run.exit.internal.suberror = 1
            run.exit.internal.ndata = 0
        message = machine.runners[0]._handle_exit()
        assert message is not None
        assert message.startswith(expected)
    finally:
        machine.close()


def test_io_handler_that_raises_puts_the_vcpu_in_error_not_a_dead_thread() -> None:
    code = bytes.fromhex("66ba3412") + bytes.fromhex("ec")  # mov dx, 0x1234; in al, dx

    def handler(port: int, size: int, is_write: bool, data: bytes) -> bytes | None:
        raise RuntimeError("device exploded")

    machine = _machine_with_code(code)
    try:
        machine.make_runners()
        machine.runners[0].io_handler = handler
        machine.start()
        message = machine.wait_error(0)
        assert "device exploded" in message
        machine.pause()  # the thread is alive and parked: it still acks
        assert machine.runners[0].parked
    finally:
        machine.close()
