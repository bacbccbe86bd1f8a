"""A small real-KVM machine for the kvm tests: memory, VM, vCPUs, runners.

Not a fake: everything is real KVM and real memfd-backed guest memory
(``squibd.vm.memory.GuestMemory``). Waiting helpers wait for a condition
with a deadline (threading events), never for a fixed time.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from squibd.kvm import GuestImage, Kvm, KvmVm, Vcpu, VcpuRunner, build_guest
from squibd.snapshot.models import X86VcpuState, X86VmState
from squibd.vm.memory import GuestMemory

#: Generous bound for conditions that normally hold within milliseconds
#: (the machine is shared and noisy); a bound, not a sleep.
DEADLINE_S: Final = 20.0
_POLL_S: Final = 0.002


def wait_for(predicate: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> None:
    """Wait until ``predicate()`` holds; fail naming ``what`` after the deadline."""
    end = time.monotonic() + deadline_s
    idle = threading.Event()
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")
        idle.wait(_POLL_S)


@attrs.define(eq=False)
class Machine:
    """A VM with ``vcpu_count`` runners; pause acks and exit errors recorded."""

    kvm: Kvm
    vm: KvmVm
    memory: GuestMemory
    vcpus: list[Vcpu]
    runners: list[VcpuRunner] = attrs.field(factory=list)
    image: GuestImage | None = None
    acks: list[threading.Event] = attrs.field(factory=list)
    errors: dict[int, str] = attrs.field(factory=dict)
    _errors_changed: threading.Event = attrs.field(factory=threading.Event)

    @classmethod
    def build(
        cls,
        vcpu_count: int,
        mem_mib: int = 8,
        *,
        memory: GuestMemory | None = None,
        log_dirty: bool = False,
        ring_bytes: int = 0,
    ) -> Machine:
        """A VM on fresh (or the given) memory; no program, no runners yet."""
        kvm = Kvm.open()
        vm = KvmVm.create(kvm)
        vm.setup_x86()
        if ring_bytes:
            vm.enable_dirty_ring(ring_bytes)
        mem = memory if memory is not None else GuestMemory.create(mem_mib)
        for slot, region in enumerate(mem.regions):
            vm.set_memory_region(
                slot, region.guest_addr, region.size, region.host_addr, log_dirty=log_dirty
            )
        vcpus = [Vcpu.create(vm, i) for i in range(vcpu_count)]
        return cls(kvm=kvm, vm=vm, memory=mem, vcpus=vcpus)

    @classmethod
    def with_program(
        cls,
        program: str,
        vcpu_count: int,
        params: dict[str, int] | None = None,
        *,
        mem_mib: int = 8,
        log_dirty: bool = False,
        ring_bytes: int = 0,
    ) -> Machine:
        """A VM running nothing yet, with ``program`` laid out and vCPUs set up."""
        machine = cls.build(vcpu_count, mem_mib, log_dirty=log_dirty, ring_bytes=ring_bytes)
        machine.image = build_guest(machine.memory, program, params or {}, vcpu_count)
        for vcpu in machine.vcpus:
            machine.image.setup_vcpu(vcpu)
        return machine

    def make_runners(self) -> None:
        self.acks = [threading.Event() for _ in self.vcpus]
        self.runners = [
            VcpuRunner(
                vcpu,
                on_paused=lambda i: self.acks[i].set(),
                on_exit_error=self._on_error,
            )
            for vcpu in self.vcpus
        ]

    def _on_error(self, index: int, message: str) -> None:
        self.errors[index] = message
        self._errors_changed.set()

    def start(self) -> None:
        if not self.runners:
            self.make_runners()
        for runner in self.runners:
            runner.start()

    def pause(self, indices: Sequence[int] | None = None) -> None:
        """Pause (all or some) vCPUs and wait for their acknowledgements."""
        chosen = range(len(self.runners)) if indices is None else indices
        for i in chosen:
            self.acks[i].clear()
            self.runners[i].request_pause()
        for i in chosen:
            if not self.acks[i].wait(DEADLINE_S):
                raise AssertionError(
                    f"vCPU {i} did not ack the pause within {DEADLINE_S} s; "
                    + runner_report(self.runners[i])
                )

    def resume(self) -> None:
        for runner in self.runners:
            runner.resume()

    def progress(self) -> list[int]:
        assert self.image is not None
        return self.image.read_progress(self.memory)

    def wait_progress_above(self, floor: Sequence[int]) -> list[int]:
        """Wait until every vCPU's progress is above ``floor[i]``."""
        wait_for(
            lambda: all(p > f for p, f in zip(self.progress(), floor, strict=True)),
            f"progress above {list(floor)}",
        )
        return self.progress()

    def wait_error(self, index: int) -> str:
        wait_for(lambda: index in self.errors, f"an exit error on vCPU {index}")
        return self.errors[index]

    def capture(self) -> tuple[X86VmState, list[X86VcpuState]]:
        return self.vm.capture_vm_state(), [vcpu.capture() for vcpu in self.vcpus]

    def close(self) -> None:
        for runner in self.runners:
            runner.stop()
        for runner in self.runners:
            runner.join(DEADLINE_S)
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.memory.close()


def runner_report(runner: VcpuRunner) -> str:
    """What a runner's thread is doing, for a failure message.

    Tells starvation from a lost wake-up: a thread that never left
    ``KVM_RUN`` (``exits`` frozen, stack in the ioctl) was not scheduled or
    not kicked; a thread parked in ``Condition.wait`` with a pause pending
    missed a notification. Reads the runner's private state (diagnostics only).
    """
    state = (
        f"runner state: pause_requested={runner._pause_requested} "
        f"pause_acked={runner._pause_acked} parked={runner._parked} "
        f"stall_armed={runner._stall_armed} stall_kick={runner._stall_kick} "
        f"error={runner.error!r} immediate_exit={int(runner.vcpu.run.immediate_exit)} "
        f"exits={runner.exits} heartbeats={runner.heartbeats}"
    )
    thread = runner._thread
    frame = sys._current_frames().get(thread.ident) if thread and thread.ident else None
    if frame is None:
        return f"{state}; thread not running"
    return f"{state}; thread stack:\n" + "".join(traceback.format_stack(frame))


def copy_memory(source: GuestMemory) -> GuestMemory:
    """A fresh memfd-backed copy of ``source`` (what a restore from a file gives)."""
    copy = GuestMemory.shared(source.manifest_regions())
    for dst, src in zip(copy.regions, source.regions, strict=True):
        dst.view[:] = src.view
    return copy
