"""The compatibility check of SPEC section 3: can this VMM run the decoded state?

The body decoded (the types are right); this checks the shapes: vCPU count,
SMT, complete vCPU states for the architecture, the kernel-struct blobs of
their kernel sizes, device ordering, and a memory manifest consistent with
``mem_size_mib``. Any problem raises
:class:`~squibd.snapshot.errors.Incompatible` whose wire message is fixed by
SPEC section 2 and whose ``detail`` names the problem, e.g.
``vcpu_states.1.lapic is 512 bytes, expected 1024``.
"""

from __future__ import annotations

import os
from typing import Final

from .errors import Incompatible
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    DIGEST_SIZES,
    KIND_DIFF,
    KIND_FULL,
    MemoryManifest,
    PageMapError,
    page_map_windows,
)
from .models import (
    PSCI_STATES,
    Aarch64MicrovmState,
    Aarch64VcpuState,
    DeviceState,
    MicrovmState,
    VmInfo,
    X86MicrovmState,
    X86VcpuState,
)

__all__ = [
    "AARCH64_FP_REG_COUNT",
    "AARCH64_FP_REG_SIZE",
    "AARCH64_X_REG_COUNT",
    "IRQCHIP_DATA_SIZE",
    "LAPIC_SIZE",
    "MAX_GUEST_PHYS_ADDR",
    "MAX_PAGE_SIZE",
    "MAX_REGIONS",
    "MAX_VCPUS",
    "MIB",
    "MIN_XSAVE_SIZE",
    "PIT_STATE2_SIZE",
    "VCPU_EVENTS_SIZE",
    "check_compatible",
    "check_page_map",
]

#: SPEC sections 3 and 9: 1 to 32 vCPUs.
MAX_VCPUS: Final = 32
MIB: Final = 1024 * 1024
#: Guest-physical addresses end below 2^52 (the widest physical address x86_64
#: and arm64 define); a region beyond cannot be given to KVM.
MAX_GUEST_PHYS_ADDR: Final = 1 << 52
#: More regions than this are not a layout any squibd VMM builds.
MAX_REGIONS: Final = 256
#: Largest page size of a manifest (1 GiB huge pages).
MAX_PAGE_SIZE: Final = 1 << 30
#: Regions are mapped in host pages.
HOST_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
#: linux/arch/x86/include/uapi/asm/kvm.h: KVM_APIC_REG_SIZE (struct kvm_lapic_state).
LAPIC_SIZE: Final = 0x400
#: asm/kvm.h: struct kvm_xsave is ``__u32 region[1024]``; XSAVE2 may return more.
MIN_XSAVE_SIZE: Final = 4096
#: asm/kvm.h: sizeof(struct kvm_vcpu_events).
VCPU_EVENTS_SIZE: Final = 64
#: asm/kvm.h: the chip union of struct kvm_irqchip is ``char dummy[512]``.
IRQCHIP_DATA_SIZE: Final = 512
#: asm/kvm.h: sizeof(struct kvm_pit_state2) (3 x 24-byte channels, flags, reserved[9]).
PIT_STATE2_SIZE: Final = 112
#: asm/kvm.h: ``interrupt_bitmap[(KVM_NR_INTERRUPTS + 63) / 64]`` with 256 interrupts.
INTERRUPT_BITMAP_WORDS: Final = 4
#: asm/kvm.h: struct kvm_debugregs ``db[4]``.
DEBUG_DB_COUNT: Final = 4
#: Arm ARM: X0-X30 and V0-V31 (128-bit each).
AARCH64_X_REG_COUNT: Final = 31
AARCH64_FP_REG_COUNT: Final = 32
AARCH64_FP_REG_SIZE: Final = 16


def _fail(detail: str) -> Incompatible:
    return Incompatible(detail)


def _check_size(path: str, blob: bytes, expected: int) -> None:
    if len(blob) != expected:
        raise _fail(f"{path} is {len(blob)} bytes, expected {expected}")


def _check_vm_info(info: VmInfo, vcpu_states: int) -> None:
    if not 1 <= info.vcpu_count <= MAX_VCPUS:
        raise _fail(f"vm_info.vcpu_count is {info.vcpu_count}, expected 1 to {MAX_VCPUS}")
    if vcpu_states != info.vcpu_count:
        raise _fail(f"{vcpu_states} vCPU states for vm_info.vcpu_count {info.vcpu_count}")
    if info.smt:
        raise _fail("vm_info.smt is true; squibd runs without SMT")
    if info.mem_size_mib < 1:
        raise _fail("vm_info.mem_size_mib is 0")


def _check_x86_vcpu(path: str, vcpu: X86VcpuState, *, has_irqchip: bool) -> None:
    if not vcpu.cpuid:
        raise _fail(f"{path}.cpuid is empty")
    if len(vcpu.xsave) < MIN_XSAVE_SIZE or len(vcpu.xsave) % 4:
        raise _fail(
            f"{path}.xsave is {len(vcpu.xsave)} bytes, expected a multiple of 4"
            f" of at least {MIN_XSAVE_SIZE}"
        )
    # KVM_GET_LAPIC needs the in-kernel irqchip; without one the LAPIC state may be empty.
    if vcpu.lapic or has_irqchip:
        _check_size(f"{path}.lapic", vcpu.lapic, LAPIC_SIZE)
    _check_size(f"{path}.vcpu_events", vcpu.vcpu_events, VCPU_EVENTS_SIZE)
    if len(vcpu.sregs.interrupt_bitmap) != INTERRUPT_BITMAP_WORDS:
        raise _fail(f"{path}.sregs.interrupt_bitmap has {len(vcpu.sregs.interrupt_bitmap)} words")
    if len(vcpu.debug_regs.db) != DEBUG_DB_COUNT:
        raise _fail(f"{path}.debug_regs.db has {len(vcpu.debug_regs.db)} registers")
    indices = [msr.index for msr in vcpu.msrs]
    if len(set(indices)) != len(indices):
        raise _fail(f"{path}.msrs lists an MSR index twice")


def _check_x86(state: X86MicrovmState) -> None:
    vm = state.vm_state
    for i, vcpu in enumerate(state.vcpu_states):
        _check_x86_vcpu(f"vcpu_states.{i}", vcpu, has_irqchip=bool(vm.irqchips))
    for i, chip in enumerate(vm.irqchips):
        _check_size(f"vm_state.irqchips.{i}.data", chip.data, IRQCHIP_DATA_SIZE)
    if vm.pit is not None:
        _check_size("vm_state.pit", vm.pit, PIT_STATE2_SIZE)


def _check_aarch64_vcpu(path: str, vcpu: Aarch64VcpuState) -> None:
    if len(vcpu.x) != AARCH64_X_REG_COUNT:
        raise _fail(f"{path}.x has {len(vcpu.x)} registers, expected {AARCH64_X_REG_COUNT}")
    if len(vcpu.v) != AARCH64_FP_REG_COUNT:
        raise _fail(f"{path}.v has {len(vcpu.v)} registers, expected {AARCH64_FP_REG_COUNT}")
    for j, reg in enumerate(vcpu.v):
        _check_size(f"{path}.v.{j}", reg, AARCH64_FP_REG_SIZE)
    if not vcpu.sys_regs:
        raise _fail(f"{path}.sys_regs is empty")
    ids = [reg.id for reg in vcpu.sys_regs]
    if len(set(ids)) != len(ids):
        raise _fail(f"{path}.sys_regs lists a register id twice")
    if vcpu.psci_state not in PSCI_STATES:
        raise _fail(f"{path}.psci_state is {vcpu.psci_state!r}, expected one of {PSCI_STATES}")


def _check_aarch64(state: Aarch64MicrovmState) -> None:
    if not state.vm_state.gic_blob:
        raise _fail("vm_state.gic_blob is empty")
    for i, vcpu in enumerate(state.vcpu_states):
        _check_aarch64_vcpu(f"vcpu_states.{i}", vcpu)


def _check_devices(devices: tuple[DeviceState, ...]) -> None:
    keys = [(device.mmio_slot, device.id) for device in devices]
    if keys != sorted(keys):
        raise _fail("device_states are not sorted by (mmio_slot, id)")
    if len(set(keys)) != len(keys):
        raise _fail("device_states list the same (mmio_slot, id) twice")


def _check_manifest(manifest: MemoryManifest, mem_size_mib: int) -> None:
    page = manifest.page_size
    if page <= 0 or page & (page - 1) or page > MAX_PAGE_SIZE:
        raise _fail(f"memory.page_size {page} is not a power of two up to {MAX_PAGE_SIZE}")
    if manifest.kind not in (KIND_FULL, KIND_DIFF):
        raise _fail(f"memory.kind is {manifest.kind!r}, expected Full or Diff")
    if manifest.kind == KIND_DIFF and not manifest.parent_pair_id:
        raise _fail("memory.kind is Diff but memory.parent_pair_id is missing")
    if not manifest.pair_id:
        raise _fail("memory.pair_id is empty")
    _check_regions(manifest, mem_size_mib)
    if manifest.page_map is not None:
        check_page_map(manifest)
        return
    end = 0
    for i, extent in enumerate(manifest.stored_extents):
        if extent.length <= 0 or extent.offset < end or extent.end > manifest.file_size:
            raise _fail(f"memory.extents.{i} overlaps, is unordered or lies beyond the file")
        end = extent.end
    _check_digests(manifest)


def _check_regions(manifest: MemoryManifest, mem_size_mib: int) -> None:
    # Regions must be mappable as they are: aligned to the manifest's page and to
    # the host page (guest memory is mapped in host pages), in guest-physical
    # order, without overlap, below the largest guest-physical address.
    align = max(manifest.page_size, HOST_PAGE_SIZE)
    if not 1 <= len(manifest.regions) <= MAX_REGIONS:
        raise _fail(f"memory.regions has {len(manifest.regions)} entries, expected 1 to"
                    f" {MAX_REGIONS}")  # fmt: skip
    expected_offset, previous_end = 0, 0
    for i, region in enumerate(manifest.regions):
        if region.file_offset != expected_offset:
            raise _fail(f"memory.regions.{i}.file_offset is not where region {i - 1} ends")
        if region.size <= 0 or region.size % align or region.guest_addr % align:
            raise _fail(f"memory.regions.{i} is not page aligned")
        end = region.guest_addr + region.size
        if end > MAX_GUEST_PHYS_ADDR:
            raise _fail(
                f"memory.regions.{i} ends at {end:#x}, beyond the guest-physical limit"
                f" {MAX_GUEST_PHYS_ADDR:#x}"
            )
        if region.guest_addr < previous_end:
            raise _fail(f"memory.regions.{i} overlaps or is not in guest-physical order")
        expected_offset += region.size
        previous_end = end
    if expected_offset != mem_size_mib * MIB:
        raise _fail(
            f"memory regions total {expected_offset} bytes"
            f" but vm_info.mem_size_mib is {mem_size_mib}"
        )
    if manifest.file_size != expected_offset:
        raise _fail(f"memory.file_size {manifest.file_size} != regions total {expected_offset}")


def check_page_map(manifest: MemoryManifest) -> None:
    """Check a compact manifest's page map and digest count (``Incompatible`` otherwise)."""
    if manifest.stored_extents:
        raise _fail("memory has both extents and a page_map")
    size = _check_digest_params(manifest)
    if manifest.chunk_size % manifest.page_size:
        raise _fail(
            f"memory.chunk_size {manifest.chunk_size} is not a multiple of memory.page_size"
            f" {manifest.page_size} (needed with a page_map)"
        )
    try:
        windows = page_map_windows(manifest)
    except PageMapError as error:
        raise _fail(f"memory.page_map: {error}") from error
    if len(manifest.digests) != windows * size:
        raise _fail(
            f"memory.digests holds {len(manifest.digests)} bytes, expected {windows} x {size}"
        )


def _check_digest_params(manifest: MemoryManifest) -> int:
    size = DIGEST_SIZES.get(manifest.digest_algorithm)
    if size is None:
        raise _fail(f"memory.digest_algorithm {manifest.digest_algorithm!r} is unknown")
    if not 0 < manifest.chunk_size <= DEFAULT_CHUNK_SIZE:
        raise _fail(f"memory.chunk_size {manifest.chunk_size} is not in 1..{DEFAULT_CHUNK_SIZE}")
    return size


def _check_digests(manifest: MemoryManifest) -> None:
    size = _check_digest_params(manifest)
    chunk = manifest.chunk_size
    # Number of chunks iter_chunks() yields, computed without iterating.
    chunks = sum(
        (extent.end - 1) // chunk - extent.offset // chunk + 1
        for extent in manifest.stored_extents
    )
    if len(manifest.digests) != chunks * size:
        raise _fail(
            f"memory.digests holds {len(manifest.digests)} bytes, expected {chunks} x {size}"
        )


def check_compatible(state: MicrovmState) -> None:
    """Raise :class:`Incompatible` unless this VMM can run ``state`` (SPEC section 3).

    Raises:
        Incompatible: with ``detail`` naming the first problem found.
    """
    _check_vm_info(state.vm_info, len(state.vcpu_states))
    if isinstance(state, X86MicrovmState):
        _check_x86(state)
    else:
        _check_aarch64(state)
    _check_devices(state.device_states)
    _check_manifest(state.memory, state.vm_info.mem_size_mib)
