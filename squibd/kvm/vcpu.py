"""One KVM vCPU: its fd, its ``kvm_run`` mapping, and its full state.

State capture and restore follow the order measured to work (KVM-NOTES):
CPUID2, SREGS, REGS, XSAVE, XCRS, DEBUGREGS, LAPIC, MSRS, VCPU_EVENTS,
MP_STATE. The FPU goes through XSAVE (``KVM_SET_FPU`` would leave XSTATE_BV
at zero); MSRs come from ``KVM_GET_MSR_INDEX_LIST``, skipping the ones KVM
refuses.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import attrs

from squibd.snapshot.models import (
    CpuidEntry,
    DebugRegs,
    DTable,
    MsrEntry,
    Segment,
    X86Regs,
    X86Sregs,
    X86VcpuState,
    Xcr,
)

from . import _abi
from .dirty_ring import DirtyRing
from .errors import KvmError
from .system import check_ioctl

if TYPE_CHECKING:
    from .vm import KvmVm

__all__ = ["CPUID_APIC_ID_SHIFT", "Vcpu"]

#: CPUID leaf 1 EBX bits 31..24 hold the initial APIC id (Intel SDM vol. 2A, CPUID).
CPUID_APIC_ID_SHIFT: Final = 24
_CPUID_LEAF_FEATURES: Final = 1
#: Extended topology leaves whose EDX is the x2APIC id.
_CPUID_TOPOLOGY_LEAVES: Final = (0xB, 0x1F)
_LOW_24_BITS: Final = (1 << CPUID_APIC_ID_SHIFT) - 1
_SEGMENT_FIELDS: Final = tuple(f.name for f in attrs.fields(Segment))
_REGS_FIELDS: Final = tuple(f.name for f in attrs.fields(X86Regs))


def _segment_to_model(seg: _abi.KvmSegment) -> Segment:
    return Segment(**{name: int(getattr(seg, name)) for name in _SEGMENT_FIELDS})


def _segment_from_model(seg: Segment, out: _abi.KvmSegment) -> None:
    for name in _SEGMENT_FIELDS:
        setattr(out, name, getattr(seg, name))


def regs_to_model(regs: _abi.KvmRegs) -> X86Regs:
    """Convert ``struct kvm_regs`` to the state model."""
    return X86Regs(**{name: int(getattr(regs, name)) for name in _REGS_FIELDS})


def sregs_to_model(sregs: _abi.KvmSregs) -> X86Sregs:
    """Convert ``struct kvm_sregs`` to the state model."""
    segs = {name: _segment_to_model(getattr(sregs, name)) for name in _abi.SREGS_SEGMENTS}
    return X86Sregs(
        **segs,
        gdt=DTable(sregs.gdt.base, sregs.gdt.limit),
        idt=DTable(sregs.idt.base, sregs.idt.limit),
        cr0=sregs.cr0,
        cr2=sregs.cr2,
        cr3=sregs.cr3,
        cr4=sregs.cr4,
        cr8=sregs.cr8,
        efer=sregs.efer,
        apic_base=sregs.apic_base,
        interrupt_bitmap=tuple(int(w) for w in sregs.interrupt_bitmap),
    )


def sregs_from_model(model: X86Sregs) -> _abi.KvmSregs:
    """Convert the state model to ``struct kvm_sregs``."""
    out = _abi.KvmSregs()
    for name in _abi.SREGS_SEGMENTS:
        _segment_from_model(getattr(model, name), getattr(out, name))
    out.gdt.base, out.gdt.limit = model.gdt.base, model.gdt.limit
    out.idt.base, out.idt.limit = model.idt.base, model.idt.limit
    out.cr0, out.cr2, out.cr3, out.cr4 = model.cr0, model.cr2, model.cr3, model.cr4
    out.cr8, out.efer, out.apic_base = model.cr8, model.efer, model.apic_base
    for i, word in enumerate(model.interrupt_bitmap):
        out.interrupt_bitmap[i] = word
    return out


@attrs.define(eq=False)
class Vcpu:
    """A vCPU fd of a :class:`~squibd.kvm.vm.KvmVm` and its mapped ``kvm_run``.

    Create with :meth:`create` (which sets CPUID and, for secondary vCPUs,
    MP_STATE RUNNABLE). Close before the VM.
    """

    vm: KvmVm
    index: int
    fd: int
    run_addr: int
    run_size: int
    #: The mapped ``struct kvm_run`` (valid until :meth:`close`).
    run: _abi.KvmRun
    xsave_size: int
    #: This vCPU's dirty ring when the VM uses rings.
    dirty_ring: DirtyRing | None = None

    @classmethod
    def create(cls, vm: KvmVm, index: int, *, set_cpuid: bool = True) -> Vcpu:
        """``KVM_CREATE_VCPU`` with id ``index``, map ``kvm_run``, set CPUID.

        Raises:
            VcpuLimitExceeded: ``index + 1`` is above what KVM allows.
            KvmIoctlError: creation failed.
        """
        vm.check_vcpu_count(index + 1)
        fd = check_ioctl("KVM_CREATE_VCPU", vm.fd, _abi.KVM_CREATE_VCPU, index)
        try:
            size = vm.kvm.vcpu_mmap_size
            addr = _abi.mmap_shared(fd, size)
        except BaseException:
            os.close(fd)
            raise
        xsave_size = max(vm.kvm.capabilities.get("KVM_CAP_XSAVE2", 0), _abi.KVM_XSAVE_SIZE)
        vcpu = cls(
            vm=vm,
            index=index,
            fd=fd,
            run_addr=addr,
            run_size=size,
            run=_abi.KvmRun.from_address(addr),
            xsave_size=xsave_size,
        )
        try:
            if vm.dirty_ring_bytes:
                vcpu.dirty_ring = DirtyRing.map(fd, vm.dirty_ring_bytes)
                vm.rings.append(vcpu.dirty_ring)
            if set_cpuid:
                vcpu.set_cpuid(vcpu.default_cpuid())
            if index > 0 and vm.has_irqchip:
                vcpu.set_mp_state(_abi.KVM_MP_STATE_RUNNABLE)
        except BaseException:
            vcpu.close()
            raise
        return vcpu

    def close(self) -> None:
        """Unmap ``kvm_run`` and close the fd (idempotent)."""
        if self.dirty_ring is not None:
            if self.dirty_ring in self.vm.rings:
                self.vm.rings.remove(self.dirty_ring)
            self.dirty_ring.close()
            self.dirty_ring = None
        if self.fd >= 0:
            _abi.munmap(self.run_addr, self.run_size)
            os.close(self.fd)
            self.fd = -1

    # --- single registers -----------------------------------------------------------
    def _call(
        self, name: str, request: int, buf: ctypes.Structure | ctypes.Array[ctypes.c_char]
    ) -> None:
        check_ioctl(name, self.fd, request, ctypes.addressof(buf))

    def default_cpuid(self) -> list[CpuidEntry]:
        """KVM's supported CPUID with this vCPU's APIC id filled in."""
        out = []
        for e in self.vm.kvm.supported_cpuid():
            if e.function == _CPUID_LEAF_FEATURES:
                ebx = (e.ebx & _LOW_24_BITS) | (self.index << CPUID_APIC_ID_SHIFT)
                e = attrs.evolve(e, ebx=ebx)
            elif e.function in _CPUID_TOPOLOGY_LEAVES:
                e = attrs.evolve(e, edx=self.index)
            out.append(e)
        return out

    def set_cpuid(self, entries: Sequence[CpuidEntry]) -> None:
        """``KVM_SET_CPUID2``."""
        buf = _abi.cpuid2_buffer(len(entries))
        for slot, e in zip(buf.entries, entries, strict=True):
            slot.function, slot.index, slot.flags = e.function, e.index, e.flags
            slot.eax, slot.ebx, slot.ecx, slot.edx = e.eax, e.ebx, e.ecx, e.edx
        self._call("KVM_SET_CPUID2", _abi.KVM_SET_CPUID2, buf)

    def get_cpuid(self) -> tuple[CpuidEntry, ...]:
        """``KVM_GET_CPUID2``: the CPUID this vCPU was given."""
        count = len(self.vm.kvm.supported_cpuid()) + 8
        buf = _abi.cpuid2_buffer(count)
        self._call("KVM_GET_CPUID2", _abi.KVM_GET_CPUID2, buf)
        return tuple(
            CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in buf.entries[: buf.nent]
        )

    def get_regs(self) -> X86Regs:
        """``KVM_GET_REGS``."""
        regs = _abi.KvmRegs()
        self._call("KVM_GET_REGS", _abi.KVM_GET_REGS, regs)
        return regs_to_model(regs)

    def set_regs(self, model: X86Regs) -> None:
        """``KVM_SET_REGS``."""
        regs = _abi.KvmRegs(**{name: getattr(model, name) for name in _REGS_FIELDS})
        self._call("KVM_SET_REGS", _abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> X86Sregs:
        """``KVM_GET_SREGS``."""
        sregs = _abi.KvmSregs()
        self._call("KVM_GET_SREGS", _abi.KVM_GET_SREGS, sregs)
        return sregs_to_model(sregs)

    def set_sregs(self, model: X86Sregs) -> None:
        """``KVM_SET_SREGS``."""
        self._call("KVM_SET_SREGS", _abi.KVM_SET_SREGS, sregs_from_model(model))

    def get_mp_state(self) -> int:
        """``KVM_GET_MP_STATE``."""
        mp = _abi.KvmMpState()
        self._call("KVM_GET_MP_STATE", _abi.KVM_GET_MP_STATE, mp)
        return int(mp.mp_state)

    def set_mp_state(self, value: int) -> None:
        """``KVM_SET_MP_STATE``."""
        self._call("KVM_SET_MP_STATE", _abi.KVM_SET_MP_STATE, _abi.KvmMpState(mp_state=value))

    def tsc_khz(self) -> int:
        """``KVM_GET_TSC_KHZ``: the guest TSC frequency in kHz."""
        return check_ioctl("KVM_GET_TSC_KHZ", self.fd, _abi.KVM_GET_TSC_KHZ)

    def _get_raw(self, name: str, request: int, size: int) -> bytes:
        buf = ctypes.create_string_buffer(size)
        self._call(name, request, buf)
        return buf.raw

    def _set_raw(self, name: str, request: int, data: bytes, size: int) -> None:
        if len(data) > size:
            raise KvmError(f"{name}: state is {len(data)} bytes, KVM takes at most {size}")
        self._call(name, request, ctypes.create_string_buffer(bytes(data), size))

    # --- MSRs ------------------------------------------------------------------
    def get_msrs(self, indices: Sequence[int] | None = None) -> tuple[MsrEntry, ...]:
        """Read MSRs (default: KVM's index list), skipping the ones KVM refuses."""
        todo = list(self.vm.kvm.msr_indices() if indices is None else indices)
        out: list[MsrEntry] = []
        while todo:
            buf = _abi.msrs_buffer(len(todo))
            for slot, index in zip(buf.entries, todo, strict=True):
                slot.index = index
            done = check_ioctl("KVM_GET_MSRS", self.fd, _abi.KVM_GET_MSRS, ctypes.addressof(buf))
            out.extend(MsrEntry(int(e.index), int(e.data)) for e in buf.entries[:done])
            # KVM stops at the first MSR it cannot read: skip it and go on.
            todo = todo[done + 1 :]
        return tuple(out)

    def set_msrs(self, entries: Sequence[MsrEntry]) -> int:
        """Write MSRs, skipping the ones KVM refuses; returns how many were set."""
        todo = list(entries)
        total = 0
        while todo:
            buf = _abi.msrs_buffer(len(todo))
            for slot, entry in zip(buf.entries, todo, strict=True):
                slot.index, slot.data = entry.index, entry.data
            done = check_ioctl("KVM_SET_MSRS", self.fd, _abi.KVM_SET_MSRS, ctypes.addressof(buf))
            total += done
            todo = todo[done + 1 :]
        return total

    # --- whole state -------------------------------------------------------------
    def capture(self) -> X86VcpuState:
        """Capture everything KVM needs to resume this vCPU (vCPU must be out of KVM_RUN)."""
        cpuid = self.get_cpuid()
        sregs = self.get_sregs()
        regs = self.get_regs()
        xsave = (
            self._get_raw("KVM_GET_XSAVE2", _abi.KVM_GET_XSAVE2, self.xsave_size)
            if self.vm.kvm.has("KVM_CAP_XSAVE2")
            else self._get_raw("KVM_GET_XSAVE", _abi.KVM_GET_XSAVE, self.xsave_size)
        )
        xcrs_buf = _abi.KvmXcrs()
        self._call("KVM_GET_XCRS", _abi.KVM_GET_XCRS, xcrs_buf)
        xcrs = tuple(Xcr(int(x.xcr), int(x.value)) for x in xcrs_buf.xcrs[: xcrs_buf.nr_xcrs])
        dbg = _abi.KvmDebugregs()
        self._call("KVM_GET_DEBUGREGS", _abi.KVM_GET_DEBUGREGS, dbg)
        lapic = (
            self._get_raw("KVM_GET_LAPIC", _abi.KVM_GET_LAPIC, _abi.KVM_LAPIC_STATE_SIZE)
            if self.vm.has_irqchip
            else b""
        )
        msrs = self.get_msrs()
        events = self._get_raw(
            "KVM_GET_VCPU_EVENTS", _abi.KVM_GET_VCPU_EVENTS, _abi.KVM_VCPU_EVENTS_SIZE
        )
        return X86VcpuState(
            cpuid=cpuid,
            regs=regs,
            sregs=sregs,
            xsave=xsave,
            xcrs=xcrs,
            msrs=msrs,
            lapic=lapic,
            vcpu_events=events,
            mp_state=self.get_mp_state(),
            debug_regs=DebugRegs(
                db=tuple(int(v) for v in dbg.db), dr6=dbg.dr6, dr7=dbg.dr7, flags=dbg.flags
            ),
        )

    def restore(self, state: X86VcpuState) -> None:
        """Restore a captured state into this (fresh, never run) vCPU."""
        self.set_cpuid(state.cpuid)
        self.set_sregs(state.sregs)
        self.set_regs(state.regs)
        self._set_raw("KVM_SET_XSAVE", _abi.KVM_SET_XSAVE, state.xsave, self.xsave_size)
        xcrs = _abi.KvmXcrs(nr_xcrs=len(state.xcrs))
        for slot, xcr in zip(xcrs.xcrs, state.xcrs, strict=False):
            slot.xcr, slot.value = xcr.xcr, xcr.value
        self._call("KVM_SET_XCRS", _abi.KVM_SET_XCRS, xcrs)
        dbg = _abi.KvmDebugregs(
            dr6=state.debug_regs.dr6, dr7=state.debug_regs.dr7, flags=state.debug_regs.flags
        )
        for i, value in enumerate(state.debug_regs.db):
            dbg.db[i] = value
        self._call("KVM_SET_DEBUGREGS", _abi.KVM_SET_DEBUGREGS, dbg)
        if state.lapic:
            self._set_raw(
                "KVM_SET_LAPIC", _abi.KVM_SET_LAPIC, state.lapic, _abi.KVM_LAPIC_STATE_SIZE
            )
        self.set_msrs(state.msrs)
        self._set_raw(
            "KVM_SET_VCPU_EVENTS",
            _abi.KVM_SET_VCPU_EVENTS,
            state.vcpu_events,
            _abi.KVM_VCPU_EVENTS_SIZE,
        )
        self.set_mp_state(state.mp_state)
