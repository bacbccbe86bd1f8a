"""The minimal x86-64 machine squibd lays out in guest RAM for its built-in programs.

Guest-physical addresses (all identity mapped):

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
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

from squibd.snapshot.compat import MAX_VCPUS
from squibd.snapshot.models import DTable, Segment, X86Sregs

__all__ = [
    "CODE_ADDR",
    "CONTROL_OFFSET",
    "CR0",
    "CR4",
    "EFER",
    "GDT_ADDR",
    "GUEST_PAGE",
    "MAPPED_GIB",
    "MAX_GUEST_VCPUS",
    "MIN_GUEST_MEMORY",
    "PDPT_ADDR",
    "PD_ADDR",
    "PML4_ADDR",
    "PROGRESS_BASE",
    "RFLAGS",
    "STACK_BASE",
    "TSS_ADDR",
    "TSS_SELECTOR",
    "USER_CODE_SELECTOR",
    "USER_DATA_SELECTOR",
    "WORKING_SET_BASE",
    "gdt_bytes",
    "initial_sregs",
    "page_table_bytes",
    "tss_bytes",
]

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
#: The guest layout has a progress page per vCPU for as many vCPUs as a state
#: file holds (``snapshot.compat.MAX_VCPUS``, SPEC sections 3 and 9).
MAX_GUEST_VCPUS: Final = MAX_VCPUS
#: RAM the layout needs below the working set.
MIN_GUEST_MEMORY: Final = WORKING_SET_BASE

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
_DESCRIPTOR_SIZE: Final = 8
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


def _descriptor(base: int, limit: int, access: int, flags: int) -> bytes:
    value = (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16  # base 23:0 in bits 39:16
        | access << 40  # type, S, DPL, P in bits 47:40
        | ((limit >> 16) & 0xF) << 48  # limit 19:16 in bits 51:48
        | flags << 52  # AVL, L, D/B, G in bits 55:52
        | ((base >> 24) & 0xFF) << 56  # base 31:24 in bits 63:56
    )
    return struct.pack("<Q", value)


def gdt_bytes() -> bytes:
    """The GDT: null, kernel code/data, user data, user code, TSS (16 bytes)."""
    flat = 0xFFFFF  # 20-bit limit, 4 KiB granular
    return b"".join(
        [
            bytes(_DESCRIPTOR_SIZE),  # the null descriptor
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
        gdt=DTable(GDT_ADDR, _GDT_ENTRIES * _DESCRIPTOR_SIZE - 1),
        idt=DTable(0, 0),
        cr0=CR0, cr3=PML4_ADDR, cr4=CR4, efer=EFER,
    )  # fmt: skip
