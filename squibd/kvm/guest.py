"""Built-in guest programs: ``counter`` and ``memwriter``, in long mode at ring 3.

Theory of operation
-------------------
squibd lays out a minimal x86-64 machine in guest RAM (guest-physical
addresses below; all identity mapped):

=============  =====================================================
``0x1000``     GDT: null, kernel code/data, user data (0x1b), user
               code (0x23), 64-bit TSS (0x28)
``0x2000``     TSS with an all-allowed I/O permission bitmap (3 pages)
``0x5000``     PML4, ``0x6000`` PDPT, ``0x7000``.. 4 page directories:
               the first 4 GiB in 2 MiB pages, user accessible, with
               the Accessed and Dirty bits preset so the CPU never
               writes the tables (the dirty log stays exact)
``0x10000``    the program's code (one page)
``0x20000``    progress pages: vCPU ``i`` owns ``0x20000 + i*0x1000``;
               its 64-bit progress counter is at offset 0, its control
               word at offset 8
``0x40000``    one stack page per vCPU (unused by the programs)
``0x100000``   ``memwriter``'s working set
=============  =====================================================

Every vCPU starts at ring 3 in 64-bit mode (KVM-NOTES: ring-0 code is
emulated slowly on the nested KVM here, ring-3 code runs natively), with
IF = 0 and no IDT, so any exception is a triple fault (``KVM_EXIT_SHUTDOWN``).
Ring 3 may use ``OUT`` through the TSS I/O permission bitmap (all ports
allowed). RFLAGS.IOPL is set to 3 as well, but measured here: the nested
KVM of these machines drops IOPL on entry (RFLAGS reads back 0x2) and an
``OUT`` without the bitmap is a #GP, hence the bitmap.

The programs leave the guest only rarely: a heartbeat ``OUT`` to
:data:`HEARTBEAT_PORT` every so many iterations. Every
:data:`CONTROL_CHECK_INTERVAL` iterations a program reads its control word;
when the host has written a non-zero value there it clears it and writes to
:data:`STALL_PORT` (the runner blocks that write while its stall hook is
armed).

``counter``: ``inc qword [progress]`` forever.
``memwriter``: each vCPU writes ``progress + 1`` to the pages of the working
set (``working_set_mib`` MiB from ``0x100000``, every ``stride_pages``-th
page, at byte offset ``8 * vcpu_index``), wrapping around, and counts writes
in its progress counter; ``write_rate_pages_per_sec`` (per vCPU, 0 = no
limit) spaces writes with RDTSC.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Protocol

import attrs

from squibd.snapshot.models import DTable, Segment, X86Regs, X86Sregs

from ._asm import Assembler
from .errors import GuestProgramError

if TYPE_CHECKING:
    from .vcpu import Vcpu

__all__ = [
    "CODE_ADDR",
    "CONTROL_CHECK_INTERVAL",
    "HEARTBEAT_PORT",
    "MAX_GUEST_VCPUS",
    "PROGRAMS",
    "PROGRESS_BASE",
    "STALL_PORT",
    "WORKING_SET_BASE",
    "GuestImage",
    "GuestMemoryLike",
    "build_guest",
    "control_addr",
    "progress_addr",
]

#: I/O port of the heartbeat (unused by PC legacy devices, so KVM exits to us).
HEARTBEAT_PORT: Final = 0xE0
#: I/O port of the stall hook (see :meth:`squibd.kvm.runner.VcpuRunner.arm_stall`).
STALL_PORT: Final = 0xE1

GUEST_PAGE: Final = 0x1000
GDT_ADDR: Final = 0x1000
TSS_ADDR: Final = 0x2000
PML4_ADDR: Final = 0x5000
PDPT_ADDR: Final = 0x6000
PD_ADDR: Final = 0x7000
#: GiB of guest-physical space identity mapped (one page directory each).
MAPPED_GIB: Final = 4
CODE_ADDR: Final = 0x10000
PROGRESS_BASE: Final = 0x20000
#: Byte offset of the control word in a vCPU's progress page.
CONTROL_OFFSET: Final = 8
STACK_BASE: Final = 0x40000
WORKING_SET_BASE: Final = 0x100000
#: SPEC section 7: 1 to 32 vCPUs.
MAX_GUEST_VCPUS: Final = 32
#: RAM the layout needs below the working set.
MIN_GUEST_MEMORY: Final = WORKING_SET_BASE
#: x86 32-bit MMIO gap start (squibd.vm.memory lays RAM out around it).
_MMIO_GAP_START: Final = 0xD000_0000

_GIB: Final = 1 << 30
_MIB: Final = 1 << 20
_TWO_MIB: Final = 2 * _MIB
_PD_ENTRIES: Final = 512
# Paging entry bits (Intel SDM vol. 3A, 4.5): present, writable, user, accessed, dirty, 2 MiB page.
_PTE_P: Final = 1 << 0
_PTE_RW: Final = 1 << 1
_PTE_US: Final = 1 << 2
_PTE_A: Final = 1 << 5
_PTE_D: Final = 1 << 6
_PTE_PS: Final = 1 << 7
_TABLE_FLAGS: Final = _PTE_P | _PTE_RW | _PTE_US | _PTE_A
_LEAF_2M_FLAGS: Final = _TABLE_FLAGS | _PTE_D | _PTE_PS

# Control registers (Intel SDM vol. 3A, 2.5).
_CR0_PE: Final = 1 << 0
_CR0_MP: Final = 1 << 1
_CR0_ET: Final = 1 << 4
_CR0_NE: Final = 1 << 5
_CR0_WP: Final = 1 << 16
_CR0_PG: Final = 1 << 31
CR0: Final = _CR0_PE | _CR0_MP | _CR0_ET | _CR0_NE | _CR0_WP | _CR0_PG
_CR4_PAE: Final = 1 << 5
_CR4_OSFXSR: Final = 1 << 9
_CR4_OSXMMEXCPT: Final = 1 << 10
CR4: Final = _CR4_PAE | _CR4_OSFXSR | _CR4_OSXMMEXCPT
_EFER_LME: Final = 1 << 8
_EFER_LMA: Final = 1 << 10
EFER: Final = _EFER_LME | _EFER_LMA
#: RFLAGS: bit 1 is always 1; IOPL (bits 12-13) = 3 so ring 3 may use OUT.
_RFLAGS_FIXED: Final = 1 << 1
_RFLAGS_IOPL3: Final = 3 << 12
RFLAGS: Final = _RFLAGS_FIXED | _RFLAGS_IOPL3

# GDT selectors (index << 3 | RPL).
_RPL3: Final = 3
USER_DATA_SELECTOR: Final = (3 << 3) | _RPL3
USER_CODE_SELECTOR: Final = (4 << 3) | _RPL3
TSS_SELECTOR: Final = 5 << 3
_GDT_ENTRIES: Final = 7  # 5 descriptors + the 16-byte TSS descriptor
# Descriptor access bytes and flags (Intel SDM vol. 3A, 3.4.5).
_ACCESS_KERNEL_CODE: Final = 0x9B
_ACCESS_KERNEL_DATA: Final = 0x93
_ACCESS_USER_DATA: Final = 0xF3
_ACCESS_USER_CODE: Final = 0xFB
_ACCESS_TSS_BUSY: Final = 0x8B
_FLAGS_CODE64: Final = 0xA  # G=1, L=1
_FLAGS_DATA: Final = 0xC  # G=1, D/B=1
_SEG_TYPE_CODE: Final = 0xB  # execute/read, accessed
_SEG_TYPE_DATA: Final = 0x3  # read/write, accessed
_SEG_TYPE_TSS_BUSY: Final = 0xB
_SEG_TYPE_LDT: Final = 0x2
_FLAT_LIMIT: Final = 0xFFFF_FFFF
#: Size of the 64-bit TSS proper (Intel SDM vol. 3A, 8.7).
_TSS_BASE_SIZE: Final = 0x68
#: Offset of the I/O map base field in the 64-bit TSS.
_TSS_IOMAP_OFFSET: Final = 0x66
#: I/O permission bitmap: one bit per port (65536 ports), plus the all-ones
#: terminator byte the CPU needs after it (Intel SDM vol. 1, 19.5.2).
_IO_BITMAP_SIZE: Final = 65536 // 8
_TSS_LIMIT: Final = _TSS_BASE_SIZE + _IO_BITMAP_SIZE + 1 - 1

#: Iterations between control-word checks (a power of two: mask = value - 1).
CONTROL_CHECK_INTERVAL: Final = 1 << 16
#: Iterations between heartbeats of ``counter`` and of ``memwriter``.
COUNTER_HEARTBEAT_INTERVAL: Final = 1 << 24
MEMWRITER_HEARTBEAT_INTERVAL: Final = 1 << 18
MEMWRITER_CONTROL_INTERVAL: Final = 1 << 12

PROGRAMS: Final = ("counter", "memwriter")
_MEMWRITER_DEFAULTS: Final = {
    "working_set_mib": 16,
    "stride_pages": 1,
    "write_rate_pages_per_sec": 0,
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


# --- programs -------------------------------------------------------------------------
def _control_check(asm: Assembler, done: str) -> None:
    """rsi = control word: if non-zero, clear it and OUT to the stall port."""
    asm.load64("rax", "rsi")
    asm.test_rr("rax", "rax")
    asm.jcc("jz", done)
    asm.store64_imm("rsi", 0)
    asm.mov_dx_imm(STALL_PORT)
    asm.out_dx_al()
    asm.label(done)


def counter_program() -> Assembler:
    """``counter``: rdi = progress counter, rsi = control word."""
    asm = Assembler()
    asm.label("loop")
    asm.inc_mem64("rdi")
    asm.test_mem32_imm("rdi", CONTROL_CHECK_INTERVAL - 1)
    asm.jcc("jnz", "loop")
    _control_check(asm, "checked")
    asm.test_mem32_imm("rdi", COUNTER_HEARTBEAT_INTERVAL - 1)
    asm.jcc("jnz", "loop")
    asm.mov_dx_imm(HEARTBEAT_PORT)
    asm.out_dx_al()
    asm.jmp("loop")
    return asm


def memwriter_program() -> Assembler:
    """``memwriter``: rdi progress, rsi control, r8 first write address, r9 end,
    r10 stride in bytes, r11 next write address, r13 TSC ticks per write (0 = no
    limit), r14 TSC deadline of the next write."""
    asm = Assembler()
    asm.label("loop")
    asm.test_rr("r13", "r13")
    asm.jcc("jz", "write")
    asm.label("wait")
    asm.rdtsc()
    asm.shl_imm("rdx", 32)
    asm.or_rr("rax", "rdx")
    asm.cmp_rr("rax", "r14")
    asm.jcc("jae", "due")
    asm.pause()
    asm.jmp("wait")
    asm.label("due")
    asm.lea_sum("r14", "rax", "r13")  # next deadline = now + ticks per write
    asm.label("write")
    asm.load64("rax", "rdi")
    asm.inc_reg64("rax")
    asm.store64("r11", "rax")  # the working-set write
    asm.store64("rdi", "rax")  # progress = writes done
    asm.add_rr("r11", "r10")
    asm.cmp_rr("r11", "r9")
    asm.jcc("jb", "no_wrap")
    asm.mov_rr("r11", "r8")
    asm.label("no_wrap")
    asm.test_eax_imm(MEMWRITER_CONTROL_INTERVAL - 1)
    asm.jcc("jnz", "loop")
    _control_check(asm, "checked")
    asm.load64("rax", "rdi")
    asm.test_eax_imm(MEMWRITER_HEARTBEAT_INTERVAL - 1)
    asm.jcc("jnz", "loop")
    asm.mov_dx_imm(HEARTBEAT_PORT)
    asm.out_dx_al()
    asm.jmp("loop")
    return asm


# --- machine layout ------------------------------------------------------------------------
def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    value = (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | ((limit >> 16) & 0xF) << 48
        | flags << 52
        | ((base >> 24) & 0xFF) << 56
    )
    return struct.pack("<Q", value)


def gdt_bytes() -> bytes:
    """The GDT: null, kernel code/data, user data, user code, TSS (16 bytes)."""
    flat = 0xFFFFF  # 20-bit limit, 4 KiB granular
    return b"".join(
        [
            bytes(8),
            _descriptor(0, flat, _ACCESS_KERNEL_CODE, _FLAGS_CODE64),
            _descriptor(0, flat, _ACCESS_KERNEL_DATA, _FLAGS_DATA),
            _descriptor(0, flat, _ACCESS_USER_DATA, _FLAGS_DATA),
            _descriptor(0, flat, _ACCESS_USER_CODE, _FLAGS_CODE64),
            _descriptor(TSS_ADDR, _TSS_LIMIT, _ACCESS_TSS_BUSY, 0),
            struct.pack("<Q", TSS_ADDR >> 32),
        ]
    )


def tss_bytes() -> bytes:
    """A zero 64-bit TSS followed by an I/O bitmap allowing every port."""
    tss = bytearray(_TSS_LIMIT + 1)
    struct.pack_into("<H", tss, _TSS_IOMAP_OFFSET, _TSS_BASE_SIZE)
    tss[-1] = 0xFF  # the terminator byte
    return bytes(tss)


def page_table_bytes() -> dict[int, bytes]:
    """Identity map of the first :data:`MAPPED_GIB` GiB: guest address -> table page."""
    tables = {
        PML4_ADDR: struct.pack("<Q", PDPT_ADDR | _TABLE_FLAGS),
        PDPT_ADDR: b"".join(
            struct.pack("<Q", (PD_ADDR + i * GUEST_PAGE) | _TABLE_FLAGS) for i in range(MAPPED_GIB)
        ),
    }
    for gib in range(MAPPED_GIB):
        tables[PD_ADDR + gib * GUEST_PAGE] = b"".join(
            struct.pack("<Q", (gib * _GIB + i * _TWO_MIB) | _LEAF_2M_FLAGS)
            for i in range(_PD_ENTRIES)
        )
    return tables


def _segment(selector: int, seg_type: int, *, code: bool) -> Segment:
    return Segment(
        base=0, limit=_FLAT_LIMIT, selector=selector, type=seg_type, present=1, dpl=_RPL3,
        db=0 if code else 1, s=1, l=1 if code else 0, g=1, avl=0, unusable=0,
    )  # fmt: skip


def initial_sregs(base: X86Sregs) -> X86Sregs:
    """``base`` (a fresh vCPU's sregs) switched to 64-bit ring 3 with squibd's tables."""
    data = _segment(USER_DATA_SELECTOR, _SEG_TYPE_DATA, code=False)
    return attrs.evolve(
        base,
        cs=_segment(USER_CODE_SELECTOR, _SEG_TYPE_CODE, code=True),
        ds=data, es=data, fs=data, gs=data, ss=data,
        tr=Segment(base=TSS_ADDR, limit=_TSS_LIMIT, selector=TSS_SELECTOR,
                   type=_SEG_TYPE_TSS_BUSY, present=1, dpl=0, db=0, s=0, l=0, g=0, avl=0,
                   unusable=0),
        ldt=Segment(base=0, limit=0, selector=0, type=_SEG_TYPE_LDT, present=0, dpl=0, db=0,
                    s=0, l=0, g=0, avl=0, unusable=1),
        gdt=DTable(GDT_ADDR, _GDT_ENTRIES * 8 - 1),
        idt=DTable(0, 0),
        cr0=CR0, cr3=PML4_ADDR, cr4=CR4, efer=EFER,
    )  # fmt: skip


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
            struct.unpack("<Q", memory.read(self.progress_addr(i), 8))[0]
            for i in range(self.vcpu_count)
        ]

    def request_stall(self, memory: GuestMemoryLike, index: int) -> None:
        """Ask vCPU ``index`` to write once to :data:`STALL_PORT` (its control word)."""
        memory.write(self.control_addr(index), struct.pack("<Q", 1))


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
        program: ``"counter"`` or ``"memwriter"``.
        params: ``{}`` for counter; memwriter takes ``working_set_mib``
            (default 16), ``stride_pages`` (default 1) and
            ``write_rate_pages_per_sec`` (per vCPU; 0, the default, = no limit).
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
        first = WORKING_SET_BASE + 8 * i
        regs.append(
            X86Regs(
                rax=0, rbx=0, rcx=0, rdx=0,
                rsi=progress + CONTROL_OFFSET, rdi=progress,
                rsp=STACK_BASE + (i + 1) * GUEST_PAGE, rbp=0,
                r8=first,
                r9=WORKING_SET_BASE + clean.get("working_set_mib", 0) * _MIB,
                r10=clean.get("stride_pages", 0) * GUEST_PAGE,
                r11=first, r12=0, r13=ticks_per_write, r14=0, r15=0,
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
