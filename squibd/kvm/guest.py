"""Built-in guest programs: ``counter``, ``memwriter`` and ``exiter``, in long mode at ring 3.

Theory of operation
-------------------
The machine layout is in :mod:`squibd.kvm.layout`, the programs' code in
:mod:`squibd.kvm.programs`. This module validates parameters, writes both
into guest memory and computes each vCPU's start registers; it re-exports the
addresses and ports other parts use.

``counter``: each vCPU does ``inc qword [progress]`` forever.
``memwriter``: each vCPU writes ``progress + 1`` to the pages of the working
set (``working_set_mib`` MiB from ``0x100000``, every ``stride_pages``-th
page, at byte offset ``8 * vcpu_index``), wrapping around, and counts writes
in its progress counter; ``write_rate_pages_per_sec`` (per vCPU, 0 = no
limit) spaces writes with RDTSC.
``exiter``: each vCPU exits to the VMM on every iteration, an ``OUT`` of
``work_units`` (0-255, default :data:`EXITER_DEFAULT_WORK_UNITS`) to
:data:`WORK_PORT`, which the VMM's work device answers with that much Python
work (:mod:`squibd.kvm.workdevice`), and counts completed requests in its
progress counter. vCPU ``i``'s 64-bit progress counter is at
guest-physical ``0x20000 + i * 0x1000`` and its control word 8 bytes later.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol

import attrs

from squibd.snapshot.models import X86Regs, X86Sregs

from .errors import GuestProgramError
from .layout import (
    CODE_ADDR,
    CONTROL_OFFSET,
    GDT_ADDR,
    GUEST_PAGE,
    MAPPED_GIB,
    MAX_GUEST_VCPUS,
    MIN_GUEST_MEMORY,
    PROGRESS_BASE,
    RFLAGS,
    STACK_BASE,
    TSS_ADDR,
    WORKING_SET_BASE,
    gdt_bytes,
    initial_sregs,
    page_table_bytes,
    tss_bytes,
)
from .programs import (
    CONTROL_CHECK_INTERVAL,
    HEARTBEAT_PORT,
    PROGRAM_NAMES,
    STALL_PORT,
    WORK_PORT,
    counter_program,
    exiter_program,
    memwriter_program,
)

if TYPE_CHECKING:
    from .vcpu import Vcpu

__all__ = [
    "CODE_ADDR",
    "CONTROL_CHECK_INTERVAL",
    "CONTROL_OFFSET",
    "EXITER_DEFAULT_WORK_UNITS",
    "GUEST_PAGE",
    "HEARTBEAT_PORT",
    "MAX_GUEST_VCPUS",
    "PROGRAMS",
    "PROGRAM_PARAMETERS",
    "PROGRESS_BASE",
    "STALL_PORT",
    "WORKING_SET_BASE",
    "WORK_PORT",
    "GuestImage",
    "GuestMemoryLike",
    "build_guest",
    "control_addr",
    "progress_addr",
]

#: The built-in program names (defined once, in ``squibd.snapshot.models``).
PROGRAMS: Final = PROGRAM_NAMES
#: The lower of the x86 32-bit MMIO gap starts squibd.vm.memory lays RAM out
#: around: 0xD000_0000 (squibd layout), 0xC000_0000 (Firecracker v1.13+ layout).
#: The working set stays below both, so it fits whichever layout the VM has.
_MMIO_GAP_START: Final = 0xC000_0000
#: Progress counters, control words and memwriter values: little-endian u64.
_U64: Final = struct.Struct("<Q")
_GIB: Final = 1 << 30
_MIB: Final = 1 << 20
_MEMWRITER_DEFAULTS: Final = {
    "working_set_mib": 16,
    "stride_pages": 1,
    "write_rate_pages_per_sec": 0,
}
#: Work units per ``exiter`` request when the caller names none: about 20 us of
#: Python work in the VMM per exit here, besides some 10 us of the runner's own
#: Python and some 30 us in ``KVM_RUN`` (``bench/vm_scaling.py`` measures the split).
EXITER_DEFAULT_WORK_UNITS: Final = 32
#: The largest request: the guest sends its size in one byte.
_EXITER_MAX_WORK_UNITS: Final = 0xFF
_EXITER_DEFAULTS: Final = {"work_units": EXITER_DEFAULT_WORK_UNITS}
_PROGRAM_DEFAULTS: Final[dict[str, dict[str, int]]] = {
    "memwriter": _MEMWRITER_DEFAULTS,
    "exiter": _EXITER_DEFAULTS,
}
#: The integer parameters each built-in program takes (counter none; memwriter's
#: working set size, stride and write rate; exiter's work units per request),
#: keyed by ``PROGRAM_NAMES``.
PROGRAM_PARAMETERS: Final[dict[str, tuple[str, ...]]] = {
    name: tuple(_PROGRAM_DEFAULTS.get(name, {})) for name in PROGRAM_NAMES
}


class GuestMemoryLike(Protocol):
    """What :func:`build_guest` needs of ``squibd.vm.memory.GuestMemory``."""

    @property
    def total_size(self) -> int: ...

    def write(self, guest_addr: int, data: bytes) -> None: ...

    def read(self, guest_addr: int, length: int) -> bytes: ...


def _check_program(program: str) -> None:
    if program not in PROGRAMS:
        raise GuestProgramError(
            f"unknown guest program {program!r}; built-in programs are {', '.join(PROGRAMS)}"
        )


def progress_addr(program: str, params: Mapping[str, int], index: int) -> int:
    """Guest-physical address of vCPU ``index``'s 64-bit progress counter."""
    del params  # the same for every program and parameter set
    _check_program(program)
    return PROGRESS_BASE + index * GUEST_PAGE


def control_addr(program: str, params: Mapping[str, int], index: int) -> int:
    """Guest-physical address of vCPU ``index``'s control word (non-zero: stall once)."""
    return progress_addr(program, params, index) + CONTROL_OFFSET


@attrs.frozen
class GuestImage:
    """A built-in program laid out in guest memory, with each vCPU's start state."""

    program: str
    params: dict[str, int]
    vcpu_count: int
    #: Initial general registers, one per vCPU.
    regs: tuple[X86Regs, ...]
    #: The program's code and its listing (for humans).
    code: bytes
    listing: str

    def progress_addr(self, index: int) -> int:
        """Guest-physical address of vCPU ``index``'s 64-bit progress counter."""
        return progress_addr(self.program, self.params, index)

    def control_addr(self, index: int) -> int:
        """Guest-physical address of vCPU ``index``'s control word."""
        return control_addr(self.program, self.params, index)

    def initial_regs(self, index: int) -> X86Regs:
        """vCPU ``index``'s initial general registers."""
        return self.regs[index]

    def initial_sregs(self, base: X86Sregs) -> X86Sregs:
        """Special registers for a vCPU whose fresh sregs are ``base``."""
        return initial_sregs(base)

    def setup_vcpu(self, vcpu: Vcpu) -> None:
        """Load the start state of ``vcpu`` (before it first runs)."""
        vcpu.set_sregs(self.initial_sregs(vcpu.get_sregs()))
        vcpu.set_regs(self.initial_regs(vcpu.index))

    def written_pages(self) -> frozenset[int]:
        """Guest page numbers the program writes in steady state (all vCPUs).

        ``counter``: the progress pages. ``memwriter``: those plus every
        ``stride_pages``-th page of the working set.
        """
        pages = {self.progress_addr(i) // GUEST_PAGE for i in range(self.vcpu_count)}
        if self.program == "memwriter":
            first = WORKING_SET_BASE // GUEST_PAGE
            count = self.params["working_set_mib"] * _MIB // GUEST_PAGE
            pages.update(range(first, first + count, self.params["stride_pages"]))
        return frozenset(pages)

    def read_progress(self, memory: GuestMemoryLike) -> list[int]:
        """Every vCPU's progress counter, read from guest memory."""
        return [
            _U64.unpack(memory.read(self.progress_addr(i), _U64.size))[0]
            for i in range(self.vcpu_count)
        ]

    def request_stall(self, memory: GuestMemoryLike, index: int) -> None:
        """Ask vCPU ``index`` to write once to :data:`STALL_PORT` (its control word)."""
        memory.write(self.control_addr(index), _U64.pack(1))


def _memwriter_params(params: Mapping[str, int], memory_size: int) -> dict[str, int]:
    unknown = set(params) - set(_MEMWRITER_DEFAULTS)
    if unknown:
        raise GuestProgramError(
            f"memwriter does not take {', '.join(sorted(unknown))}; "
            f"its parameters are {', '.join(_MEMWRITER_DEFAULTS)}"
        )
    out = {**_MEMWRITER_DEFAULTS, **{k: int(v) for k, v in params.items()}}
    if out["working_set_mib"] < 1 or out["stride_pages"] < 1 or out["write_rate_pages_per_sec"] < 0:
        raise GuestProgramError(
            "memwriter needs working_set_mib >= 1, stride_pages >= 1 and "
            f"write_rate_pages_per_sec >= 0 (got {out})"
        )
    limit = min(memory_size, _MMIO_GAP_START, MAPPED_GIB * _GIB)
    end = WORKING_SET_BASE + out["working_set_mib"] * _MIB
    if end > limit:
        raise GuestProgramError(
            f"memwriter working_set_mib={out['working_set_mib']} does not fit: the working set "
            f"starts at {WORKING_SET_BASE:#x} and guest RAM usable for it ends at {limit:#x}"
        )
    return out


def _exiter_params(params: Mapping[str, int]) -> dict[str, int]:
    unknown = set(params) - set(_EXITER_DEFAULTS)
    if unknown:
        raise GuestProgramError(
            f"exiter does not take {', '.join(sorted(unknown))}; "
            f"its parameters are {', '.join(_EXITER_DEFAULTS)}"
        )
    out = {**_EXITER_DEFAULTS, **{k: int(v) for k, v in params.items()}}
    if not 0 <= out["work_units"] <= _EXITER_MAX_WORK_UNITS:
        raise GuestProgramError(
            f"exiter needs 0 <= work_units <= {_EXITER_MAX_WORK_UNITS} (got {out['work_units']})"
        )
    return out


def build_guest(
    memory: GuestMemoryLike,
    program: str,
    params: Mapping[str, int],
    vcpu_count: int,
    *,
    tsc_khz: int | None = None,
) -> GuestImage:
    """Write tables and code of a built-in program into guest memory.

    Args:
        memory: guest RAM (``squibd.vm.memory.GuestMemory``), at least 1 MiB
            plus the working set.
        program: ``"counter"``, ``"memwriter"`` or ``"exiter"``.
        params: ``{}`` for counter; memwriter takes ``working_set_mib``
            (default 16), ``stride_pages`` (default 1) and
            ``write_rate_pages_per_sec`` (per vCPU; 0, the default, = no limit);
            exiter takes ``work_units`` (0-255, default 32).
        vcpu_count: 1 to 32.
        tsc_khz: guest TSC frequency, needed only with a write rate
            (default: asked of KVM through a scratch vCPU).

    Raises:
        GuestProgramError: unknown program, bad parameters, or memory too small
            (also a ``ValueError``).
    """
    _check_program(program)
    if not 1 <= vcpu_count <= MAX_GUEST_VCPUS:
        raise GuestProgramError(f"vcpu_count must be 1 to {MAX_GUEST_VCPUS}, got {vcpu_count}")
    if memory.total_size < MIN_GUEST_MEMORY:
        raise GuestProgramError(
            f"guest memory of {memory.total_size} bytes is too small for {program}; "
            f"it needs at least {MIN_GUEST_MEMORY} bytes"
        )
    if program == "counter":
        if params:
            raise GuestProgramError(f"counter takes no parameters, got {sorted(params)}")
        clean: dict[str, int] = {}
        asm = counter_program()
    elif program == "exiter":
        clean = _exiter_params(params)
        asm = exiter_program()
    else:
        clean = _memwriter_params(params, memory.total_size)
        asm = memwriter_program()
    code = asm.assemble()
    memory.write(GDT_ADDR, gdt_bytes())
    memory.write(TSS_ADDR, tss_bytes())
    for addr, table in page_table_bytes().items():
        memory.write(addr, table)
    memory.write(CODE_ADDR, code)
    ticks_per_write = 0
    if clean.get("write_rate_pages_per_sec", 0) > 0:
        khz = tsc_khz if tsc_khz is not None else _host_tsc_khz()
        ticks_per_write = max(1, khz * 1000 // clean["write_rate_pages_per_sec"])
    regs = []
    for i in range(vcpu_count):
        progress = progress_addr(program, clean, i)
        memory.write(progress, bytes(GUEST_PAGE))
        first = WORKING_SET_BASE + _U64.size * i  # each vCPU its own qword of a page
        regs.append(
            X86Regs(
                rax=0, rbx=0, rcx=0, rdx=0,
                rsi=progress + CONTROL_OFFSET, rdi=progress,
                rsp=STACK_BASE + (i + 1) * GUEST_PAGE, rbp=0,
                r8=first,
                r9=WORKING_SET_BASE + clean.get("working_set_mib", 0) * _MIB,
                r10=clean.get("stride_pages", 0) * GUEST_PAGE,
                r11=first, r12=clean.get("work_units", 0),
                r13=ticks_per_write, r14=0, r15=0,
                rip=CODE_ADDR, rflags=RFLAGS,
            )
        )  # fmt: skip
    return GuestImage(
        program=program,
        params=clean,
        vcpu_count=vcpu_count,
        regs=tuple(regs),
        code=code,
        listing=asm.listing(),
    )


def _host_tsc_khz() -> int:
    """The guest TSC frequency KVM gives a new vCPU (a scratch VM, closed at once)."""
    from .system import Kvm
    from .vcpu import Vcpu
    from .vm import KvmVm

    with Kvm.open() as kvm, KvmVm.create(kvm) as vm:
        vcpu = Vcpu.create(vm, 0, set_cpuid=False)
        try:
            return vcpu.tsc_khz()
        finally:
            vcpu.close()
