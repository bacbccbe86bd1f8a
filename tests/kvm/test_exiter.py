"""The ``exiter`` guest program and the VMM's work device, on real KVM (issue 11)."""

from __future__ import annotations

import collections.abc
import threading

import attrs
import pytest

from squibd.api import make_wire_converter, structure_params
from squibd.api.models import VmCreateParams
from squibd.kvm import GuestProgramError, VcpuRunner, programs
from squibd.kvm.guest import EXITER_DEFAULT_WORK_UNITS, PROGRAM_PARAMETERS, WORK_PORT, build_guest
from squibd.kvm.workdevice import WorkDevice, work
from squibd.rpc import RpcError
from squibd.snapshot.models import PROGRAM_NAMES
from squibd.vm.memory import GuestMemory

from ._harness import Machine, wait_for

_OUT_DX_AL = 0xEE


@attrs.define(eq=False)
class _Exiter:
    """An ``exiter`` machine whose runners send every port write to ``device``."""

    machine: Machine
    device: WorkDevice
    ports: list[int]


def _exiter(vcpu_count: int, params: dict[str, int]) -> _Exiter:
    machine = Machine.with_program("exiter", vcpu_count, params)
    device = WorkDevice()
    ports: list[int] = []

    def io(port: int, size: int, is_write: bool, data: bytes) -> bytes | None:
        if port == WORK_PORT and is_write:
            device.handle(data)
        elif port not in ports:
            ports.append(port)
        return None

    machine.acks = [threading.Event() for _ in machine.vcpus]
    machine.runners = [
        VcpuRunner(
            vcpu,
            io_handler=io,
            on_paused=lambda i: machine.acks[i].set(),
            on_exit_error=lambda i, m: machine.errors.__setitem__(i, m),
        )
        for vcpu in machine.vcpus
    ]
    return _Exiter(machine, device, ports)


@pytest.fixture
def exiter1() -> collections.abc.Iterator[_Exiter]:
    rig = _exiter(1, {"work_units": 3})
    try:
        yield rig
    finally:
        rig.machine.close()


def test_exiter_is_a_program_name_with_one_parameter() -> None:
    assert "exiter" in PROGRAM_NAMES
    assert PROGRAM_PARAMETERS["exiter"] == ("work_units",)


def test_vm_create_takes_exiter_with_work_units_only() -> None:
    converter = make_wire_converter()
    create = {"vm_id": "x", "vcpu_count": 1, "mem_size_mib": 64}
    guest = {"program": "exiter", "work_units": 8}
    params = structure_params(converter, {**create, "guest": guest}, VmCreateParams)
    assert (params.guest.program, params.guest.params) == ("exiter", {"work_units": 8})
    with pytest.raises(RpcError, match=r"params\.guest\.pages: unknown field"):
        structure_params(converter, {**create, "guest": {**guest, "pages": 1}}, VmCreateParams)


def test_exiter_writes_its_request_size_to_the_work_port() -> None:
    code = programs.exiter_program().assemble()
    mov_dx = bytes([0x66, 0xBA]) + WORK_PORT.to_bytes(2, "little")
    assert code.index(mov_dx) < code.index(bytes([_OUT_DX_AL]))
    with GuestMemory.create(4) as memory:
        image = build_guest(memory, "exiter", {}, 2)
        assert image.params == {"work_units": EXITER_DEFAULT_WORK_UNITS}
        assert [image.initial_regs(i).r12 for i in range(2)] == [EXITER_DEFAULT_WORK_UNITS] * 2
        assert build_guest(memory, "exiter", {"work_units": 255}, 1).initial_regs(0).r12 == 255


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"work_units": 256}, "work_units <= 255"),
        ({"work_units": -1}, "0 <= work_units"),
        ({"pages": 1}, "exiter does not take pages"),
    ],
)
def test_bad_exiter_parameters_are_refused(params: dict[str, int], message: str) -> None:
    with GuestMemory.create(4) as memory, pytest.raises(GuestProgramError, match=message):
        build_guest(memory, "exiter", params, 1)


def test_work_device_does_the_requested_units_and_counts_them() -> None:
    device = WorkDevice()
    device.handle(bytes([5]))
    device.handle(bytes([0]))
    device.handle(b"")
    assert (device.requests, device.units) == (3, 5)
    after_five = (1 + work(5, 1)) & ((1 << 64) - 1)
    assert work(5, 1) != 1
    assert device.state == (4 * after_five) & ((1 << 64) - 1)  # a size-0 request doubles it
    other = WorkDevice()
    other.handle(bytes([6]))
    assert other.state != WorkDevice().state


@pytest.mark.kvm
def test_exiter_progress_counts_completed_work_requests(exiter1: _Exiter) -> None:
    machine, device = exiter1.machine, exiter1.device
    assert machine.progress() == [0]
    machine.start()
    first = machine.wait_progress_above([0])
    machine.pause()
    done = machine.progress()[0]
    # One request per iteration, counted after its OUT completed: every
    # counted iteration had its request handled, and at most one more is in flight.
    assert done <= device.requests <= done + 1
    assert device.units == 3 * device.requests
    assert machine.runners[0].exits >= device.requests
    machine.resume()
    assert machine.wait_progress_above([max(first[0], done)])[0] > done
    assert machine.errors == {}


@pytest.mark.kvm
def test_exiter_sends_heartbeats_and_honours_its_control_word(exiter1: _Exiter) -> None:
    machine = exiter1.machine
    assert machine.image is not None
    machine.start()
    runner = machine.runners[0]
    wait_for(lambda: runner.heartbeats >= 1, "an exiter heartbeat")
    assert machine.progress()[0] >= programs.EXITER_HEARTBEAT_INTERVAL
    runner.arm_stall(kick=False)
    machine.image.request_stall(machine.memory, 0)
    assert runner.wait_stalled(20)
    assert machine.memory.read(machine.image.control_addr(0), 8) == bytes(8)
    held = machine.progress()[0]
    requests = exiter1.device.requests
    assert held <= requests <= held + 1
    runner.release_stall()
    machine.wait_progress_above([held])
    # The stall write stays in the runner; the program uses no port but these three.
    assert exiter1.ports == [programs.HEARTBEAT_PORT]
