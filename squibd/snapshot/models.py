"""State models: the body of a state file (SPEC section 3).

Values only: frozen attrs classes with no serialization hooks (the codec
builds its converter in ``codec.py``). The x86_64 vCPU state holds what KVM
needs to resume a vCPU exactly; opaque kernel structs whose layout is the
kernel's (XSAVE area, LAPIC registers, vCPU events, irqchip, PIT) are kept
as the raw bytes KVM returned, sizes checked by ``compat.py``.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

import attrs

from .manifest import MemoryManifest

__all__ = [
    "DEFAULT_PROGRAM",
    "PROGRAM_NAMES",
    "PSCI_STATES",
    "Aarch64MicrovmState",
    "Aarch64VcpuState",
    "Aarch64VmState",
    "ClockState",
    "CpuidEntry",
    "DTable",
    "DebugRegs",
    "DeviceState",
    "IrqchipState",
    "MicrovmState",
    "MmdsState",
    "MsrEntry",
    "ProgramName",
    "Segment",
    "SnapshotMetadata",
    "SysReg",
    "VmInfo",
    "X86MicrovmState",
    "X86Regs",
    "X86Sregs",
    "X86VcpuState",
    "X86VmState",
    "Xcr",
]

#: The built-in guest programs (squibd/kvm/programs.py assembles them). The one
#: spelling of their names: the API model, squibctl, the Firecracker API and the
#: KVM backend import these (this module is the layer every other one may import).
ProgramName = Literal["counter", "memwriter", "exiter"]
PROGRAM_NAMES: Final[tuple[ProgramName, ...]] = get_args(ProgramName)
#: The program ``vm.create`` runs when the caller names none.
DEFAULT_PROGRAM: Final[ProgramName] = "counter"


@attrs.frozen
class VmInfo:
    """How the VM was created (SPEC section 3, ``vm_info``)."""

    mem_size_mib: int
    vcpu_count: int
    smt: bool = False
    cpu_template: str = "None"
    track_dirty_pages: bool = False
    #: Built-in guest program (one of ``PROGRAM_NAMES``) or None for a kernel.
    guest_program: str | None = None
    guest_params: dict[str, int] = attrs.field(factory=dict)
    kernel_path: str | None = None
    boot_args: str | None = None
    #: The guest-physical RAM layout the VM was created with (issue 14): "squibd"
    #: (default; files without the field) or "firecracker" (v1.13+ x86_64 gaps).
    memory_layout: str = "squibd"


@attrs.frozen
class SnapshotMetadata:
    """Who took a snapshot, when and where, plus the caller's labels (optional in the file).

    ``created_at`` is ISO 8601 UTC; ``vm_id`` is the id of the VM that was saved.
    """

    created_at: str | None = None
    vm_id: str | None = None
    host: str | None = None
    labels: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class DeviceState:
    """One emulated device; lists of these are sorted by ``(mmio_slot, id)``."""

    kind: str
    id: str
    mmio_slot: int
    blob: bytes


@attrs.frozen
class MmdsState:
    """The microVM metadata service's store."""

    data_json: str
    token_ttl_seconds: int


# --- x86_64 -----------------------------------------------------------------


@attrs.frozen
class X86Regs:
    """General-purpose registers (``struct kvm_regs``)."""

    rax: int
    rbx: int
    rcx: int
    rdx: int
    rsi: int
    rdi: int
    rsp: int
    rbp: int
    r8: int
    r9: int
    r10: int
    r11: int
    r12: int
    r13: int
    r14: int
    r15: int
    rip: int
    rflags: int


@attrs.frozen
class Segment:
    """A segment register (``struct kvm_segment``)."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the kernel's field name
    g: int
    avl: int
    unusable: int


@attrs.frozen
class DTable:
    """A descriptor table register (``struct kvm_dtable``)."""

    base: int
    limit: int


@attrs.frozen
class X86Sregs:
    """Special registers (``struct kvm_sregs``)."""

    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    ldt: Segment
    gdt: DTable
    idt: DTable
    cr0: int
    cr2: int
    cr3: int
    cr4: int
    cr8: int
    efer: int
    apic_base: int
    #: ``interrupt_bitmap[4]`` of the kernel struct.
    interrupt_bitmap: tuple[int, ...]


@attrs.frozen
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


@attrs.frozen
class MsrEntry:
    """One model-specific register: index -> value."""

    index: int
    data: int


@attrs.frozen
class Xcr:
    """One extended control register (``struct kvm_xcr``)."""

    xcr: int
    value: int


@attrs.frozen
class DebugRegs:
    """Debug registers (``struct kvm_debugregs``)."""

    db: tuple[int, ...]
    dr6: int
    dr7: int
    flags: int


@attrs.frozen
class X86VcpuState:
    """Everything KVM needs to resume one x86_64 vCPU exactly."""

    cpuid: tuple[CpuidEntry, ...]
    regs: X86Regs
    sregs: X86Sregs
    #: ``KVM_GET_XSAVE2`` area (FPU, SSE, AVX ...), raw.
    xsave: bytes
    xcrs: tuple[Xcr, ...]
    msrs: tuple[MsrEntry, ...]
    #: ``struct kvm_lapic_state`` (1024 bytes of APIC registers), raw.
    lapic: bytes
    #: ``struct kvm_vcpu_events``, raw.
    vcpu_events: bytes
    mp_state: int
    debug_regs: DebugRegs


@attrs.frozen
class ClockState:
    """KVM clock (``struct kvm_clock_data``: clock and flags)."""

    clock: int
    flags: int


@attrs.frozen
class IrqchipState:
    """One in-kernel interrupt controller chip (``struct kvm_irqchip``), raw."""

    chip_id: int
    data: bytes


@attrs.frozen
class X86VmState:
    """VM-level x86_64 state: clock, in-kernel irqchip and PIT where present."""

    clock: ClockState | None
    irqchips: tuple[IrqchipState, ...]
    #: ``struct kvm_pit_state2``, raw; None when the VM has no PIT.
    pit: bytes | None


@attrs.frozen
class X86MicrovmState:
    """The body of an x86_64 state file."""

    vm_info: VmInfo
    vm_state: X86VmState
    vcpu_states: tuple[X86VcpuState, ...]
    device_states: tuple[DeviceState, ...]
    mmds_state: MmdsState | None
    memory: MemoryManifest
    #: Optional (absent in files written before it existed).
    metadata: SnapshotMetadata | None = None


# --- aarch64 (for attached VMMs) ---------------------------------------------

#: PSCI power states of an aarch64 vCPU.
PSCI_STATES: Final = ("On", "Off", "OnPending")


@attrs.frozen
class SysReg:
    """One aarch64 system register: KVM register id -> value."""

    id: int
    value: int


@attrs.frozen
class Aarch64VcpuState:
    """Everything needed to resume one aarch64 vCPU."""

    #: X0 to X30.
    x: tuple[int, ...]
    sp: int
    pc: int
    pstate: int
    #: V0 to V31, 16 little-endian bytes each (128-bit values).
    v: tuple[bytes, ...]
    fpsr: int
    fpcr: int
    sys_regs: tuple[SysReg, ...]
    psci_state: str  # one of PSCI_STATES


@attrs.frozen
class Aarch64VmState:
    """VM-level aarch64 state: the interrupt controller as an opaque blob."""

    gic_blob: bytes


@attrs.frozen
class Aarch64MicrovmState:
    """The body of an aarch64 state file."""

    vm_info: VmInfo
    vm_state: Aarch64VmState
    vcpu_states: tuple[Aarch64VcpuState, ...]
    device_states: tuple[DeviceState, ...]
    mmds_state: MmdsState | None
    memory: MemoryManifest
    #: Optional (absent in files written before it existed).
    metadata: SnapshotMetadata | None = None


MicrovmState = X86MicrovmState | Aarch64MicrovmState
