"""KVM-level figures: vCPU pause latency (p50/p99) and state capture time.

- ``pause_ms`` (1 and 2 vCPUs running ``counter``): from ``request_pause()``
  on every runner to the last ``on_paused`` acknowledgement; then resume.
  Baseline ``signal_floor_ms``: the same signal round trip to a plain thread
  blocked in libc ``pause()`` (no KVM): the cost of the kick mechanism alone.
- ``capture_ms`` (2 vCPUs, paused): ``Vcpu.capture()`` for each vCPU plus
  ``KvmVm.capture_vm_state()`` (state models built). Baseline
  ``raw_ioctl_ms``: the same GET ioctls into preallocated buffers, no
  models, MSRs in one call.
- ``restore_ms``: a fresh VM (KVM fds, irqchip, PIT, 64 MiB slot, vCPUs)
  with the captured state restored, ready to run (closing it is not timed);
  no baseline (reported alone).

Run: ``python bench/kvm_capture.py [--quick]``; one JSON object on the last line.
"""

from __future__ import annotations

import ctypes
import threading
import time
from typing import Any

import _common

from squibd.kvm import Kvm, KvmVm, Vcpu, VcpuRunner, _abi, build_guest
from squibd.kvm.system import check_ioctl
from squibd.snapshot.models import X86VcpuState, X86VmState
from squibd.vm.memory import GuestMemory

#: Pause cycles per vCPU count (percentiles need many samples; each is ~0.1 ms).
PAUSE_CYCLES = 400
QUICK_PAUSE_CYCLES = 100
#: Guest RAM of the bench VMs (the counter needs 1 MiB; capture does not read RAM).
MEM_MIB = 64
#: Bound on one acknowledgement wait (a stuck vCPU fails the bench, never hangs it).
ACK_DEADLINE_S = 10.0
#: Time the guest runs between pause cycles so each pause hits a running vCPU.
RUN_BETWEEN_S = 0.0005
#: The baseline thread missed a kick if it has not woken by then.
RESEND_AFTER_S = 0.05


class _Vm:
    """A running ``counter`` VM with runners whose acks release a semaphore."""

    def __init__(self, vcpu_count: int, memory: GuestMemory | None = None) -> None:
        self.kvm = Kvm.open()
        self.vm = KvmVm.create(self.kvm)
        self.vm.setup_x86()
        self.memory = memory or GuestMemory.create(MEM_MIB)
        for slot, region in enumerate(self.memory.regions):
            self.vm.set_memory_region(
                slot, region.guest_addr, region.size, region.host_addr, log_dirty=False
            )
        self.vcpus = [Vcpu.create(self.vm, i) for i in range(vcpu_count)]
        self.acks = threading.Semaphore(0)
        self.runners = [VcpuRunner(v, on_paused=lambda i: self.acks.release()) for v in self.vcpus]

    def load_counter(self) -> None:
        image = build_guest(self.memory, "counter", {}, len(self.vcpus))
        for vcpu in self.vcpus:
            image.setup_vcpu(vcpu)

    def pause(self) -> None:
        for runner in self.runners:
            runner.request_pause()
        for _ in self.runners:
            if not self.acks.acquire(timeout=ACK_DEADLINE_S):
                raise RuntimeError("a vCPU did not acknowledge the pause")

    def resume(self) -> None:
        for runner in self.runners:
            runner.resume()

    def close(self, *, keep_memory: bool = False) -> None:
        for runner in self.runners:
            runner.stop()
        for runner in self.runners:
            runner.join()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.kvm.close()
        if not keep_memory:
            self.memory.close()


def _pause_latency(vcpu_count: int, cycles: int) -> _common.Stats:
    machine = _Vm(vcpu_count)
    try:
        machine.load_counter()
        for runner in machine.runners:
            runner.start()
        samples = []
        idle = threading.Event()
        for i in range(cycles + 10):
            idle.wait(RUN_BETWEEN_S)
            t0 = time.perf_counter()
            machine.pause()
            elapsed = time.perf_counter() - t0
            machine.resume()
            if i >= 10:  # warm-up cycles
                samples.append(elapsed * 1000.0)
        return _common.summarize(samples)
    finally:
        machine.close()


_libc = ctypes.CDLL(None, use_errno=True)


def _signal_floor(cycles: int) -> _common.Stats:
    """Kick a thread out of libc pause() with SIGUSR1 and wait for its ack."""
    from squibd.kvm.runner import PAUSE_SIGNAL, install_signal_handler

    install_signal_handler()
    ack = threading.Semaphore(0)
    go = threading.Semaphore(0)
    stop = False

    def body() -> None:
        while True:
            go.acquire()
            if stop:
                return
            _libc.pause()  # returns -1/EINTR when the signal arrives
            ack.release()

    import signal

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    samples = []
    idle = threading.Event()
    assert thread.ident is not None
    for i in range(cycles + 10):
        go.release()
        idle.wait(RUN_BETWEEN_S)  # let it block in pause()
        t0 = time.perf_counter()
        signal.pthread_kill(thread.ident, PAUSE_SIGNAL)
        # A signal that lands before the thread reaches pause() is consumed
        # and pause() then waits forever: kick again, and drop that sample
        # (it measured the race, not the wake-up).
        deadline, kicks = time.monotonic() + ACK_DEADLINE_S, 1
        while not ack.acquire(timeout=RESEND_AFTER_S):
            if time.monotonic() > deadline:
                raise RuntimeError("the baseline thread did not wake")
            kicks += 1
            signal.pthread_kill(thread.ident, PAUSE_SIGNAL)
        if i >= 10 and kicks == 1:
            samples.append((time.perf_counter() - t0) * 1000.0)
    stop = True
    go.release()
    signal.pthread_kill(thread.ident, PAUSE_SIGNAL)
    thread.join(ACK_DEADLINE_S)
    return _common.summarize(samples)


def _raw_capture(vm: KvmVm, vcpus: list[Vcpu]) -> None:
    """The capture ioctls into preallocated buffers (no state models)."""
    indices = vm.kvm.msr_indices()
    for vcpu in vcpus:
        for request, size in (
            (_abi.KVM_GET_CPUID2, 0),
            (_abi.KVM_GET_SREGS, ctypes.sizeof(_abi.KvmSregs)),
            (_abi.KVM_GET_REGS, ctypes.sizeof(_abi.KvmRegs)),
            (_abi.KVM_GET_XSAVE2, vcpu.xsave_size),
            (_abi.KVM_GET_XCRS, ctypes.sizeof(_abi.KvmXcrs)),
            (_abi.KVM_GET_DEBUGREGS, ctypes.sizeof(_abi.KvmDebugregs)),
            (_abi.KVM_GET_LAPIC, _abi.KVM_LAPIC_STATE_SIZE),
            (_abi.KVM_GET_VCPU_EVENTS, _abi.KVM_VCPU_EVENTS_SIZE),
            (_abi.KVM_GET_MP_STATE, ctypes.sizeof(_abi.KvmMpState)),
        ):
            if request == _abi.KVM_GET_CPUID2:
                buf: Any = _abi.cpuid2_buffer(len(vm.kvm.supported_cpuid()) + 8)
            else:
                buf = ctypes.create_string_buffer(size)
            _abi.ioctl_raw(vcpu.fd, request, ctypes.addressof(buf))
        msrs = _abi.msrs_buffer(len(indices))
        for slot, index in zip(msrs.entries, indices, strict=True):
            slot.index = index
        _abi.ioctl_raw(vcpu.fd, _abi.KVM_GET_MSRS, ctypes.addressof(msrs))
    clock = _abi.KvmClockData()
    check_ioctl("KVM_GET_CLOCK", vm.fd, _abi.KVM_GET_CLOCK, ctypes.addressof(clock))
    for chip_id in (0, 1, 2):
        chip = _abi.KvmIrqchip(chip_id=chip_id)
        _abi.ioctl_raw(vm.fd, _abi.KVM_GET_IRQCHIP, ctypes.addressof(chip))
    pit = ctypes.create_string_buffer(_abi.KVM_PIT_STATE2_SIZE)
    _abi.ioctl_raw(vm.fd, _abi.KVM_GET_PIT2, ctypes.addressof(pit))


def _capture_and_restore(reps: int) -> dict[str, Any]:
    machine = _Vm(2)
    captured: list[tuple[X86VmState, list[X86VcpuState]]] = []
    try:
        machine.load_counter()
        for runner in machine.runners:
            runner.start()
        machine.pause()

        def capture() -> None:
            captured.append((machine.vm.capture_vm_state(), [v.capture() for v in machine.vcpus]))

        squibd = _common.measure(capture, reps=reps, warmup=2)
        raw = _common.measure(lambda: _raw_capture(machine.vm, machine.vcpus), reps=reps,
                              warmup=2)  # fmt: skip
        vm_state, vcpu_states = captured[-1]

        built: list[_Vm] = []

        def restore() -> None:
            target = _Vm(2, memory=machine.memory)
            built.append(target)
            target.vm.restore_vm_state(vm_state)
            for vcpu, state in zip(target.vcpus, vcpu_states, strict=True):
                vcpu.restore(state)

        def teardown() -> None:  # closing KVM fds is not part of a restore
            while built:
                built.pop().close(keep_memory=True)

        restored = _common.measure(restore, reps=reps, warmup=1, teardown=teardown)
    finally:
        machine.close()
    return {
        "capture_ms": squibd.scaled(1000).to_dict(),
        "raw_ioctl_ms": raw.scaled(1000).to_dict(),
        "capture_ratio": _common.ratio(squibd.median, raw.median),
        "restore_ms": restored.scaled(1000).to_dict(),
        "msrs_per_vcpu": len(vcpu_states[0].msrs),
        "xsave_bytes": len(vcpu_states[0].xsave),
    }


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("kvm_capture", "needs /dev/kvm")
    cycles = QUICK_PAUSE_CYCLES if args.quick else PAUSE_CYCLES
    floor = _signal_floor(cycles)
    pauses = {}
    for count in (1, 2):
        stats = _pause_latency(count, cycles)
        pauses[f"pause_ms_{count}vcpu"] = stats.to_dict(p99=True)
        pauses[f"pause_ratio_{count}vcpu"] = _common.ratio(stats.median, floor.median)
    return {
        **pauses,
        "signal_floor_ms": floor.to_dict(p99=True),
        **_capture_and_restore(max(args.reps, 10)),
        "machine": _common.machine_info(),
    }


if __name__ == "__main__":
    _common.run_bench("kvm_capture", main, _common.parse_args(__doc__ or ""))
