"""The built-in guest programs as hand-assembled x86-64 code.

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
``exiter``: exits to the VMM on every iteration: an ``OUT`` to
:data:`WORK_PORT` whose byte is the request size (``work_units``, held in
r12), which the VMM's work device (:mod:`squibd.kvm.workdevice`) answers
with that much Python work; then it counts the completed request in its
progress counter. It reads its control word every iteration and sends a
heartbeat every :data:`EXITER_HEARTBEAT_INTERVAL` requests, so its exits
are ``progress * (1 + 1 / EXITER_HEARTBEAT_INTERVAL)`` plus stalls.
"""

from __future__ import annotations

from typing import Final

from squibd.snapshot.models import PROGRAM_NAMES

from ._asm import Assembler

__all__ = [
    "CONTROL_CHECK_INTERVAL",
    "COUNTER_HEARTBEAT_INTERVAL",
    "EXITER_HEARTBEAT_INTERVAL",
    "HEARTBEAT_PORT",
    "MEMWRITER_CONTROL_INTERVAL",
    "MEMWRITER_HEARTBEAT_INTERVAL",
    "PROGRAM_NAMES",
    "STALL_PORT",
    "WORK_PORT",
    "counter_program",
    "exiter_program",
    "memwriter_program",
]

#: I/O port of the heartbeat (unused by PC legacy devices, so KVM exits to us).
HEARTBEAT_PORT: Final = 0xE0
#: I/O port of the stall hook (see :meth:`squibd.kvm.runner.VcpuRunner.arm_stall`).
STALL_PORT: Final = 0xE1
#: I/O port of the ``exiter``'s work requests (the VMM's work device).
WORK_PORT: Final = 0xE2

#: Iterations between control-word checks (a power of two: mask = value - 1).
CONTROL_CHECK_INTERVAL: Final = 1 << 16
#: Iterations between heartbeats of ``counter`` and of ``memwriter``.
COUNTER_HEARTBEAT_INTERVAL: Final = 1 << 24
MEMWRITER_HEARTBEAT_INTERVAL: Final = 1 << 18
MEMWRITER_CONTROL_INTERVAL: Final = 1 << 12
#: Work requests (exits) between heartbeats of ``exiter``.
EXITER_HEARTBEAT_INTERVAL: Final = 1 << 10


def _control_check(asm: Assembler, done: str) -> None:
    """rsi = control word: if non-zero, clear it and OUT to the stall port."""
    asm.load64("rax", "rsi")
    asm.test_rr("rax", "rax")
    asm.jcc("jz", done)
    asm.store64_imm("rsi", 0)
    asm.mov_dx_imm(STALL_PORT)
    asm.out_dx_al()
    asm.label(done)


def _heartbeat_then_loop(asm: Assembler, interval: int) -> None:
    """Every ``interval`` counts of the progress counter (rdi), OUT to the heartbeat port."""
    asm.test_mem32_imm("rdi", interval - 1)
    asm.jcc("jnz", "loop")
    asm.mov_dx_imm(HEARTBEAT_PORT)
    asm.out_dx_al()
    asm.jmp("loop")


def counter_program() -> Assembler:
    """``counter``: rdi = progress counter, rsi = control word."""
    asm = Assembler()
    asm.label("loop")
    asm.inc_mem64("rdi")
    asm.test_mem32_imm("rdi", CONTROL_CHECK_INTERVAL - 1)
    asm.jcc("jnz", "loop")
    _control_check(asm, "checked")
    _heartbeat_then_loop(asm, COUNTER_HEARTBEAT_INTERVAL)
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


def exiter_program() -> Assembler:
    """``exiter``: rdi progress, rsi control, r12 work units per request (0-255)."""
    asm = Assembler()
    asm.label("loop")
    asm.mov_rr("rax", "r12")
    asm.mov_dx_imm(WORK_PORT)
    asm.out_dx_al()  # the request: the VMM does AL units of work before we go on
    asm.inc_mem64("rdi")  # progress = requests completed
    _control_check(asm, "checked")
    _heartbeat_then_loop(asm, EXITER_HEARTBEAT_INTERVAL)
    return asm
