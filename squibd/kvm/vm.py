"""A KVM virtual machine: memory slots, in-kernel devices, dirty log, VM-level state."""

from __future__ import annotations

import ctypes
import os
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

from squibd.snapshot.models import ClockState, IrqchipState, X86VmState

from . import _abi
from .dirty_ring import DirtyRing, DirtyRingInUse, RingCollector
from .errors import KvmError, KvmIoctlError, KvmUnsupported, VcpuLimitExceeded
from .system import FdOwner, Kvm, check_ioctl

__all__ = [
    "DEFAULT_TSS_ADDR",
    "IRQCHIP_IDS",
    "PAGE_SIZE",
    "DirtyLogNotEnabled",
    "KvmVm",
    "MemorySlot",
]

#: Guest-physical address of the 3-page TSS region KVM needs on Intel (the
#: conventional value, just below the 4 GiB boundary, used by Firecracker).
DEFAULT_TSS_ADDR: Final = 0xFFFB_D000
#: Host page size: KVM's dirty log has one bit per page of this size.
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
#: In-kernel irqchip ids: PIC master, PIC slave, IOAPIC (``KVM_IRQCHIP_*``).
IRQCHIP_IDS: Final = (0, 1, 2)
_BITS_PER_WORD: Final = 64


class DirtyLogNotEnabled(KvmError):
    """The dirty log of a slot was read while logging is off for that slot."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        super().__init__(
            f"memory slot {slot} does not log dirty pages; enable it with "
            "set_dirty_logging(slot, True) first"
        )


@attrs.define(eq=False)
class MemorySlot:
    """One KVM memory slot as squibd registered it."""

    slot: int
    guest_addr: int
    size: int
    host_addr: int
    log_dirty: bool

    @property
    def pages(self) -> int:
        """Number of dirty-log pages in the slot."""
        return (self.size + PAGE_SIZE - 1) // PAGE_SIZE

    @property
    def bitmap_words(self) -> int:
        """Number of 64-bit words in the slot's dirty bitmap."""
        return (self.pages + _BITS_PER_WORD - 1) // _BITS_PER_WORD


@attrs.define(eq=False)
class KvmVm(FdOwner):
    """A KVM VM fd with its memory slots and in-kernel devices.

    Create with :meth:`create`; then :meth:`create_irqchip`,
    :meth:`create_pit2` and :meth:`set_tss_addr` (or :meth:`setup_x86` for
    all three) before any vCPU; close it after its vCPUs.
    """

    kvm: Kvm
    fd: int
    #: Whether ``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`` is enabled on this VM.
    manual_dirty_protect: bool
    slots: dict[int, MemorySlot] = attrs.field(factory=dict)
    has_irqchip: bool = False
    has_pit: bool = False
    #: Size of each vCPU's dirty ring in bytes; 0 = the bitmap dirty log.
    dirty_ring_bytes: int = 0
    rings: list[DirtyRing] = attrs.field(factory=list)
    _ring_collector: RingCollector | None = None

    @classmethod
    def create(cls, kvm: Kvm) -> KvmVm:
        """``KVM_CREATE_VM``; enables manual dirty-log protect when the host has it.

        Raises:
            KvmUnsupported: a required capability is missing (named).
            KvmIoctlError: VM creation failed.
        """
        kvm.require_all()
        fd = check_ioctl("KVM_CREATE_VM", kvm.fd, _abi.KVM_CREATE_VM, 0)
        vm = cls(kvm=kvm, fd=fd, manual_dirty_protect=False)
        try:
            supported = kvm.capabilities.get("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", 0)
            if supported & _abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                cap = _abi.KvmEnableCap(cap=_abi.CAPABILITIES["KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2"])
                cap.args[0] = _abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                check_ioctl("KVM_ENABLE_CAP", fd, _abi.KVM_ENABLE_CAP, ctypes.addressof(cap))
                vm.manual_dirty_protect = True
        except BaseException:
            vm.close()
            raise
        return vm

    # --- devices ---------------------------------------------------------------
    def set_tss_addr(self, addr: int = DEFAULT_TSS_ADDR) -> None:
        """``KVM_SET_TSS_ADDR`` (an unsigned argument: ctypes ioctl, no overflow)."""
        check_ioctl("KVM_SET_TSS_ADDR", self.fd, _abi.KVM_SET_TSS_ADDR, addr)

    def create_irqchip(self) -> None:
        """``KVM_CREATE_IRQCHIP``: in-kernel PIC, IOAPIC and LAPICs (before any vCPU)."""
        self.kvm.require("KVM_CAP_IRQCHIP")
        check_ioctl("KVM_CREATE_IRQCHIP", self.fd, _abi.KVM_CREATE_IRQCHIP)
        self.has_irqchip = True

    def create_pit2(self) -> None:
        """``KVM_CREATE_PIT2``: the in-kernel PIT (after the irqchip)."""
        self.kvm.require("KVM_CAP_PIT2")
        config = _abi.KvmPitConfig(flags=0)
        check_ioctl("KVM_CREATE_PIT2", self.fd, _abi.KVM_CREATE_PIT2, ctypes.addressof(config))
        self.has_pit = True

    def setup_x86(self) -> None:
        """TSS address, irqchip and PIT, in the order KVM needs."""
        self.set_tss_addr()
        self.create_irqchip()
        self.create_pit2()

    def enable_dirty_ring(self, ring_bytes: int) -> None:
        """Log dirty pages in per-vCPU rings of ``ring_bytes`` (before any vCPU).

        Raises:
            KvmUnsupported: the host has no dirty ring, or not of this size.
        """
        name = "KVM_CAP_DIRTY_LOG_RING_ACQ_REL"
        if not self.kvm.has(name):
            name = "KVM_CAP_DIRTY_LOG_RING"
        limit = self.kvm.require(name)
        if ring_bytes < PAGE_SIZE or ring_bytes > limit or ring_bytes & (ring_bytes - 1):
            raise KvmUnsupported(
                name, f"ring size {ring_bytes} must be a power of two from {PAGE_SIZE} to {limit}"
            )
        cap = _abi.KvmEnableCap(cap=_abi.CAPABILITIES[name])
        cap.args[0] = ring_bytes
        check_ioctl("KVM_ENABLE_CAP", self.fd, _abi.KVM_ENABLE_CAP, ctypes.addressof(cap))
        self.dirty_ring_bytes = ring_bytes
        self._ring_collector = RingCollector(self.fd)

    def collect_dirty_ring(self, ring: DirtyRing) -> int:
        """Collect one vCPU's ring now (a ring-full exit); kept until the next harvest."""
        if self._ring_collector is None:
            raise KvmError("this VM has no dirty ring")
        return self._ring_collector.collect([ring])

    def harvest_dirty_rings(self) -> dict[int, npt.NDArray[np.uint64]]:
        """Collect every vCPU's ring; all pages dirtied since the last harvest, as
        bitmap words per slot (the layout of :meth:`harvest_dirty_log`)."""
        if self._ring_collector is None:
            raise KvmError("this VM has no dirty ring; use harvest_dirty_log(slot)")
        self._ring_collector.collect(self.rings)
        return self._ring_collector.take({s: info.pages for s, info in self.slots.items()})

    def check_vcpu_count(self, count: int) -> None:
        """Raise :class:`VcpuLimitExceeded` when ``count`` is above what KVM allows."""
        if count < 1 or count > self.kvm.max_vcpus:
            raise VcpuLimitExceeded(count, self.kvm.max_vcpus)

    # --- memory ----------------------------------------------------------------
    def set_memory_region(
        self, slot: int, guest_addr: int, size: int, host_addr: int, *, log_dirty: bool
    ) -> MemorySlot:
        """Register (or re-register) a memory slot backed by ``host_addr``.

        Args:
            slot: slot number (0 .. KVM_CAP_NR_MEMSLOTS-1).
            guest_addr: guest-physical start, page aligned.
            size: bytes, page aligned.
            host_addr: address of a host mapping of at least ``size`` bytes.
            log_dirty: set ``KVM_MEM_LOG_DIRTY_PAGES``.
        """
        region = _abi.KvmUserspaceMemoryRegion(
            slot=slot,
            flags=_abi.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0,
            guest_phys_addr=guest_addr,
            memory_size=size,
            userspace_addr=host_addr,
        )
        check_ioctl(
            "KVM_SET_USER_MEMORY_REGION",
            self.fd,
            _abi.KVM_SET_USER_MEMORY_REGION,
            ctypes.addressof(region),
        )
        info = MemorySlot(slot, guest_addr, size, host_addr, log_dirty)
        self.slots[slot] = info
        return info

    def set_dirty_logging(self, slot: int, enabled: bool) -> None:
        """Turn dirty logging on or off for an existing slot (re-registers it)."""
        info = self.slots[slot]
        if info.log_dirty != enabled:
            self.set_memory_region(
                slot, info.guest_addr, info.size, info.host_addr, log_dirty=enabled
            )

    def harvest_dirty_log(self, slot: int) -> npt.NDArray[np.uint64]:
        """Read and reset the slot's dirty log.

        Returns one bit per page (bit ``p % 64`` of word ``p // 64``, the
        little-endian bit order of the kernel's bitmap). With manual protect
        the log is read (``KVM_GET_DIRTY_LOG``) and then exactly the returned
        bits are cleared (``KVM_CLEAR_DIRTY_LOG``); without it the GET both
        reads and clears.

        Raises:
            DirtyLogNotEnabled: logging is off for the slot.
            DirtyRingInUse: the VM logs through dirty rings instead.
        """
        info = self.slots[slot]
        if not info.log_dirty:
            raise DirtyLogNotEnabled(slot)
        if self.dirty_ring_bytes:
            raise DirtyRingInUse(slot)
        words = np.zeros(info.bitmap_words, dtype=np.uint64)
        address = int(words.ctypes.data)
        log = _abi.KvmDirtyLog(slot=slot, dirty_bitmap=address)
        check_ioctl("KVM_GET_DIRTY_LOG", self.fd, _abi.KVM_GET_DIRTY_LOG, ctypes.addressof(log))
        if self.manual_dirty_protect and words.any():
            clear = _abi.KvmClearDirtyLog(
                slot=slot, num_pages=info.pages, first_page=0, dirty_bitmap=address
            )
            # The kernel may only read the bitmap, but pass a copy so that
            # what we return is exactly what was harvested, whatever it does.
            result = words.copy()
            check_ioctl(
                "KVM_CLEAR_DIRTY_LOG", self.fd, _abi.KVM_CLEAR_DIRTY_LOG, ctypes.addressof(clear)
            )
            return result
        return words

    # --- VM-level state ------------------------------------------------------------
    def capture_vm_state(self) -> X86VmState:
        """Capture the KVM clock, the irqchips (PIC x2, IOAPIC) and the PIT."""
        clock_data = _abi.KvmClockData()
        check_ioctl("KVM_GET_CLOCK", self.fd, _abi.KVM_GET_CLOCK, ctypes.addressof(clock_data))
        chips: list[IrqchipState] = []
        if self.has_irqchip:
            for chip_id in IRQCHIP_IDS:
                chip = _abi.KvmIrqchip(chip_id=chip_id)
                check_ioctl(
                    "KVM_GET_IRQCHIP", self.fd, _abi.KVM_GET_IRQCHIP, ctypes.addressof(chip)
                )
                chips.append(IrqchipState(chip_id, bytes(chip)[_abi.KvmIrqchip.chip.offset :]))
        pit: bytes | None = None
        if self.has_pit:
            buf = ctypes.create_string_buffer(_abi.KVM_PIT_STATE2_SIZE)
            check_ioctl("KVM_GET_PIT2", self.fd, _abi.KVM_GET_PIT2, ctypes.addressof(buf))
            pit = buf.raw
        return X86VmState(
            clock=ClockState(clock=clock_data.clock, flags=clock_data.flags),
            irqchips=tuple(chips),
            pit=pit,
        )

    def restore_vm_state(self, state: X86VmState) -> None:
        """Restore irqchips, PIT and clock (in that order) into this fresh VM.

        Raises:
            KvmUnsupported: the state has irqchip/PIT data but this VM has none.
        """
        for chip_state in state.irqchips:
            if not self.has_irqchip:
                raise KvmUnsupported("KVM_CAP_IRQCHIP", "create the irqchip before restoring")
            if len(chip_state.data) != _abi.KVM_IRQCHIP_DATA_SIZE:
                raise KvmError(
                    f"irqchip {chip_state.chip_id} state is {len(chip_state.data)} bytes, "
                    f"KVM needs {_abi.KVM_IRQCHIP_DATA_SIZE}"
                )
            chip = _abi.KvmIrqchip(chip_id=chip_state.chip_id)
            # (c_char arrays assigned from bytes stop at the first NUL: copy raw.)
            ctypes.memmove(
                ctypes.addressof(chip) + _abi.KvmIrqchip.chip.offset,
                bytes(chip_state.data),
                _abi.KVM_IRQCHIP_DATA_SIZE,
            )
            check_ioctl("KVM_SET_IRQCHIP", self.fd, _abi.KVM_SET_IRQCHIP, ctypes.addressof(chip))
        if state.pit is not None:
            if not self.has_pit:
                raise KvmUnsupported("KVM_CAP_PIT2", "create the PIT before restoring")
            buf = ctypes.create_string_buffer(bytes(state.pit), _abi.KVM_PIT_STATE2_SIZE)
            check_ioctl("KVM_SET_PIT2", self.fd, _abi.KVM_SET_PIT2, ctypes.addressof(buf))
        if state.clock is not None:
            # Flags describe how the clock was read (TSC_STABLE, REALTIME ...);
            # setting REALTIME would need the realtime field we do not keep.
            clock = _abi.KvmClockData(clock=state.clock.clock, flags=0)
            try:
                check_ioctl("KVM_SET_CLOCK", self.fd, _abi.KVM_SET_CLOCK, ctypes.addressof(clock))
            except KvmIoctlError as error:
                raise KvmError(f"restoring the KVM clock failed: {error}") from error
