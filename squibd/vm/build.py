"""Building a ``Vm``: fresh with a built-in guest program, or restored from state.

Both paths run in a worker thread (they make KVM ioctls and touch memory)
and release everything they created when a step fails:

- ``build_fresh``: new memfd RAM, the guest program's tables and code, a
  KVM VM (TSS, irqchip, PIT), memory slots, vCPUs with the program's start
  registers. The VM is NotStarted.
- ``build_restored``: RAM given by the loader (a private file mapping or
  userfaultfd-backed anonymous memory), a KVM VM and vCPUs, then VM-level
  state (irqchip, PIT, clock) BEFORE vCPU state, the order KVM-NOTES found
  to work. The VM is Paused with its threads not yet started.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..kvm import guest as kvm_guest
from ..kvm.errors import VcpuLimitExceeded
from ..kvm.system import Kvm
from ..kvm.vcpu import Vcpu
from ..kvm.vm import KvmVm
from ..snapshot.models import VmInfo, X86VcpuState, X86VmState
from .errors import InvalidVmConfig
from .machine import MAX_VCPUS, Vm
from .memory import DEFAULT_MEMORY_LAYOUT, GuestMemory, MemoryLayoutError
from .models import GuestSpec, VmState
from .quiesce import VcpuGate

__all__ = ["build_fresh", "build_restored", "check_config"]


def check_config(vm_id: str, vcpu_count: int, mem_size_mib: int) -> None:
    """Refuse a vCPU count or memory size no VM can have.

    Raises:
        InvalidVmConfig: naming the bad value.
    """
    if not 1 <= vcpu_count <= MAX_VCPUS:
        raise InvalidVmConfig(vm_id, f"vcpu_count must be 1 to {MAX_VCPUS}, not {vcpu_count}")
    if mem_size_mib < 1:
        raise InvalidVmConfig(vm_id, f"mem_size_mib must be at least 1, not {mem_size_mib}")


def _close_all(vcpus: Sequence[Vcpu], kvm_vm: KvmVm | None, kvm: Kvm | None) -> None:
    for vcpu in vcpus:
        vcpu.close()
    if kvm_vm is not None:
        kvm_vm.close()
    if kvm is not None:
        kvm.close()


def open_vm() -> tuple[Kvm, KvmVm]:
    """``/dev/kvm`` and a new VM with its in-kernel devices (no memory, no vCPUs yet)."""
    kvm = Kvm.open()
    try:
        kvm_vm = KvmVm.create(kvm)
    except BaseException:
        kvm.close()
        raise
    try:
        kvm_vm.setup_x86()
    except BaseException:
        _close_all((), kvm_vm, kvm)
        raise
    return kvm, kvm_vm


def _open_kvm(
    vm_id: str,
    vcpu_count: int,
    memory: GuestMemory,
    track_dirty_pages: bool,
    prepared: tuple[Kvm, KvmVm] | None = None,
) -> tuple[Kvm, KvmVm, list[Vcpu]]:
    """A KVM VM with in-kernel devices, one slot per region, and ``vcpu_count`` vCPUs.

    ``prepared``: the result of :func:`open_vm`, made ahead (a spare VM process's);
    closed here on failure.
    """
    kvm, kvm_vm = prepared if prepared is not None else open_vm()
    vcpus: list[Vcpu] = []
    try:
        if vcpu_count > kvm.max_vcpus:
            raise InvalidVmConfig(
                vm_id, f"vcpu_count {vcpu_count} exceeds the {kvm.max_vcpus} vCPUs KVM allows here"
            )
        for slot, region in enumerate(memory.regions):
            kvm_vm.set_memory_region(
                slot, region.guest_addr, region.size, region.host_addr, log_dirty=track_dirty_pages
            )
        for index in range(vcpu_count):
            vcpus.append(Vcpu.create(kvm_vm, index))
    except VcpuLimitExceeded as error:
        _close_all(vcpus, kvm_vm, kvm)
        raise InvalidVmConfig(vm_id, str(error)) from error
    except BaseException:
        _close_all(vcpus, kvm_vm, kvm)
        raise
    return kvm, kvm_vm, vcpus


def build_fresh(
    vm_id: str,
    vcpu_count: int,
    mem_size_mib: int,
    track_dirty_pages: bool,
    guest: GuestSpec,
    *,
    token: trio.lowlevel.TrioToken,
    quiesce_timeout_s: float,
    memory_layout: str = DEFAULT_MEMORY_LAYOUT,
) -> Vm:
    """A NotStarted VM running ``guest`` in fresh memfd RAM. Blocking.

    ``memory_layout`` names the guest-physical RAM layout (``memory.MEMORY_LAYOUTS``).

    Raises:
        InvalidVmConfig: bad vCPU count, memory size, layout or guest program.
    """
    check_config(vm_id, vcpu_count, mem_size_mib)
    try:
        memory = GuestMemory.create(mem_size_mib, name=f"squibd-{vm_id}", layout=memory_layout)
    except MemoryLayoutError as error:
        raise InvalidVmConfig(vm_id, str(error)) from error
    try:
        try:
            image = kvm_guest.build_guest(memory, guest.program, dict(guest.params), vcpu_count)
        except (ValueError, KeyError) as error:
            raise InvalidVmConfig(vm_id, f"guest {guest.program!r}: {error}") from error
        kvm, kvm_vm, vcpus = _open_kvm(vm_id, vcpu_count, memory, track_dirty_pages)
        try:
            for vcpu in vcpus:
                image.setup_vcpu(vcpu)
            return Vm(
                vm_id=vm_id,
                track_dirty_pages=track_dirty_pages,
                guest=GuestSpec(image.program, dict(image.params)),
                memory=memory,
                quiesce_timeout_s=quiesce_timeout_s,
                kvm=kvm,
                kvm_vm=kvm_vm,
                vcpus=vcpus,
                gate=VcpuGate(vcpu_count, token),
                progress_addrs=tuple(image.progress_addr(i) for i in range(vcpu_count)),
            )
        except BaseException:
            _close_all(vcpus, kvm_vm, kvm)
            raise
    except BaseException:
        memory.close()
        raise


def build_restored(
    vm_id: str,
    info: VmInfo,
    vm_state: X86VmState,
    vcpu_states: Sequence[X86VcpuState],
    memory: GuestMemory,
    *,
    track_dirty_pages: bool,
    token: trio.lowlevel.TrioToken,
    quiesce_timeout_s: float,
) -> Vm:
    """A Paused VM rebuilt from captured state on ``memory``. Blocking.

    The caller keeps ownership of ``memory`` if this raises.

    Raises:
        InvalidVmConfig: the state's vCPU count or sizes are not usable.
        KvmError: KVM refused a piece of state.
    """
    check_config(vm_id, info.vcpu_count, info.mem_size_mib)
    if len(vcpu_states) != info.vcpu_count:
        raise InvalidVmConfig(
            vm_id, f"state has {len(vcpu_states)} vCPU states for {info.vcpu_count} vCPUs"
        )
    kvm, kvm_vm, vcpus = _open_kvm(vm_id, info.vcpu_count, memory, track_dirty_pages)
    try:
        kvm_vm.restore_vm_state(vm_state)
        for vcpu, vcpu_state in zip(vcpus, vcpu_states, strict=True):
            vcpu.restore(vcpu_state)
        guest: GuestSpec | None = None
        progress: tuple[int, ...] = ()
        if info.guest_program is not None:
            guest = GuestSpec(info.guest_program, dict(info.guest_params))
            progress = tuple(
                kvm_guest.progress_addr(guest.program, guest.params, i)
                for i in range(info.vcpu_count)
            )
        vm = Vm(
            vm_id=vm_id,
            track_dirty_pages=track_dirty_pages,
            guest=guest,
            memory=memory,
            quiesce_timeout_s=quiesce_timeout_s,
            kvm=kvm,
            kvm_vm=kvm_vm,
            vcpus=vcpus,
            gate=VcpuGate(info.vcpu_count, token),
            progress_addrs=progress,
        )
    except BaseException:
        _close_all(vcpus, kvm_vm, kvm)
        raise
    vm.state = VmState.PAUSED
    return vm

