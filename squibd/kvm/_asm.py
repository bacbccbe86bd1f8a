"""A tiny x86-64 assembler for the built-in guest programs.

Not a general assembler: each method emits one hand-encoded instruction
(encodings from the Intel SDM vol. 2; each method says which form) and
records a comment, so a program reads like an assembly listing
(:meth:`Assembler.listing`). Jumps are ``rel8`` to labels, resolved by
:meth:`Assembler.assemble`.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs

__all__ = ["Assembler", "AssemblerError"]

#: 64-bit register numbers (ModRM/REX encoding order).
REG: Final = {
    name: number
    for number, name in enumerate(
        [
            "rax",
            "rcx",
            "rdx",
            "rbx",
            "rsp",
            "rbp",
            "rsi",
            "rdi",
            "r8",
            "r9",
            "r10",
            "r11",
            "r12",
            "r13",
            "r14",
            "r15",
        ]
    )
}
_REX: Final = 0x40
_REX_W: Final = 0x08
_REX_R: Final = 0x04
_REX_X: Final = 0x02
_REX_B: Final = 0x01
_MOD_INDIRECT: Final = 0b00
_MOD_REGISTER: Final = 0b11
_RM_SIB: Final = 0b100
_RM_RBP_DISP32: Final = 0b101
_OPERAND_SIZE_PREFIX: Final = 0x66
_REL8_MIN: Final = -128
_REL8_MAX: Final = 127
#: Conditional jump opcodes (``Jcc rel8``).
JCC: Final = {"jz": 0x74, "jnz": 0x75, "jb": 0x72, "jae": 0x73}
_JMP_REL8: Final = 0xEB


class AssemblerError(ValueError):
    """A program could not be encoded (unknown label, jump out of rel8 range)."""


def _modrm(mod: int, reg: int, rm: int) -> int:
    return (mod << 6) | ((reg & 7) << 3) | (rm & 7)


def _rex(w: bool, reg: int = 0, index: int = 0, base: int = 0) -> int:
    return (
        _REX
        | (_REX_W if w else 0)
        | (_REX_R if reg >= 8 else 0)
        | (_REX_X if index >= 8 else 0)
        | (_REX_B if base >= 8 else 0)
    )


def _mem_operand(reg: int, base: int) -> bytes:
    """ModRM for ``[base]`` (no displacement) with ``reg`` in the reg field."""
    if base & 7 in (_RM_SIB, _RM_RBP_DISP32):
        raise AssemblerError("[rsp]/[rbp]/[r12]/[r13] need SIB/disp forms this assembler omits")
    return bytes([_modrm(_MOD_INDIRECT, reg, base)])


@attrs.define(eq=False)
class _Jump:
    offset: int  # of the rel8 byte
    label: str


@attrs.define(eq=False)
class Assembler:
    """Collects instructions; :meth:`assemble` returns the machine code."""

    _code: bytearray = attrs.field(factory=bytearray)
    _labels: dict[str, int] = attrs.field(factory=dict)
    _jumps: list[_Jump] = attrs.field(factory=list)
    _lines: list[tuple[int, bytes, str]] = attrs.field(factory=list)

    def _emit(self, data: bytes, text: str) -> None:
        self._lines.append((len(self._code), bytes(data), text))
        self._code += data

    def label(self, name: str) -> None:
        """Define ``name`` at the current offset."""
        if name in self._labels:
            raise AssemblerError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)
        self._lines.append((len(self._code), b"", f"{name}:"))

    # --- instructions -------------------------------------------------------------
    def inc_mem64(self, base: str) -> None:
        """``inc qword [base]``: REX.W FF /0."""
        b = REG[base]
        self._emit(bytes([_rex(True, base=b), 0xFF]) + _mem_operand(0, b), f"inc qword [{base}]")

    def inc_reg64(self, reg: str) -> None:
        """``inc reg``: REX.W FF /0 (register form)."""
        r = REG[reg]
        self._emit(bytes([_rex(True, base=r), 0xFF, _modrm(_MOD_REGISTER, 0, r)]), f"inc {reg}")

    def test_mem32_imm(self, base: str, imm: int) -> None:
        """``test dword [base], imm32``: F7 /0 id."""
        b = REG[base]
        rex = bytes([_rex(False, base=b)]) if b >= 8 else b""
        self._emit(
            rex + b"\xf7" + _mem_operand(0, b) + struct.pack("<I", imm),
            f"test dword [{base}], {imm:#x}",
        )

    def test_eax_imm(self, imm: int) -> None:
        """``test eax, imm32``: A9 id."""
        self._emit(b"\xa9" + struct.pack("<I", imm), f"test eax, {imm:#x}")

    def load64(self, dst: str, base: str) -> None:
        """``mov dst, [base]``: REX.W 8B /r."""
        d, b = REG[dst], REG[base]
        self._emit(
            bytes([_rex(True, reg=d, base=b), 0x8B]) + _mem_operand(d, b), f"mov {dst}, [{base}]"
        )

    def store64(self, base: str, src: str) -> None:
        """``mov [base], src``: REX.W 89 /r."""
        s, b = REG[src], REG[base]
        self._emit(
            bytes([_rex(True, reg=s, base=b), 0x89]) + _mem_operand(s, b), f"mov [{base}], {src}"
        )

    def store64_imm(self, base: str, imm: int) -> None:
        """``mov qword [base], imm32`` (sign-extended): REX.W C7 /0 id."""
        b = REG[base]
        self._emit(
            bytes([_rex(True, base=b), 0xC7]) + _mem_operand(0, b) + struct.pack("<i", imm),
            f"mov qword [{base}], {imm}",
        )

    def _alu_rr(self, opcode: int, mnemonic: str, dst: str, src: str) -> None:
        d, s = REG[dst], REG[src]
        self._emit(
            bytes([_rex(True, reg=s, base=d), opcode, _modrm(_MOD_REGISTER, s, d)]),
            f"{mnemonic} {dst}, {src}",
        )

    def mov_rr(self, dst: str, src: str) -> None:
        """``mov dst, src``: REX.W 89 /r."""
        self._alu_rr(0x89, "mov", dst, src)

    def add_rr(self, dst: str, src: str) -> None:
        """``add dst, src``: REX.W 01 /r."""
        self._alu_rr(0x01, "add", dst, src)

    def or_rr(self, dst: str, src: str) -> None:
        """``or dst, src``: REX.W 09 /r."""
        self._alu_rr(0x09, "or", dst, src)

    def cmp_rr(self, dst: str, src: str) -> None:
        """``cmp dst, src`` (flags of dst - src): REX.W 39 /r."""
        self._alu_rr(0x39, "cmp", dst, src)

    def test_rr(self, dst: str, src: str) -> None:
        """``test dst, src``: REX.W 85 /r."""
        self._alu_rr(0x85, "test", dst, src)

    def shl_imm(self, reg: str, count: int) -> None:
        """``shl reg, imm8``: REX.W C1 /4 ib."""
        r = REG[reg]
        self._emit(
            bytes([_rex(True, base=r), 0xC1, _modrm(_MOD_REGISTER, 4, r), count]),
            f"shl {reg}, {count}",
        )

    def lea_sum(self, dst: str, base: str, index: str) -> None:
        """``lea dst, [base + index]``: REX.W 8D /r with a SIB byte (scale 1)."""
        d, b, i = REG[dst], REG[base], REG[index]
        if b & 7 == _RM_RBP_DISP32 or i == REG["rsp"]:
            raise AssemblerError("lea form not supported for these registers")
        sib = (i & 7) << 3 | (b & 7)
        rex = _rex(True, reg=d, index=i, base=b)
        self._emit(
            bytes([rex, 0x8D, _modrm(_MOD_INDIRECT, d, _RM_SIB), sib]),
            f"lea {dst}, [{base} + {index}]",
        )

    def rdtsc(self) -> None:
        """``rdtsc`` (EDX:EAX = TSC; allowed at ring 3 while CR4.TSD = 0): 0F 31."""
        self._emit(b"\x0f\x31", "rdtsc")

    def pause(self) -> None:
        """``pause`` (spin-wait hint): F3 90."""
        self._emit(b"\xf3\x90", "pause")

    def mov_dx_imm(self, imm: int) -> None:
        """``mov dx, imm16``: 66 BA iw."""
        self._emit(
            bytes([_OPERAND_SIZE_PREFIX, 0xBA]) + struct.pack("<H", imm), f"mov dx, {imm:#x}"
        )

    def out_dx_al(self) -> None:
        """``out dx, al`` (needs CPL <= IOPL): EE."""
        self._emit(b"\xee", "out dx, al")

    def ud2(self) -> None:
        """``ud2`` (raises #UD): 0F 0B."""
        self._emit(b"\x0f\x0b", "ud2")

    def jcc(self, condition: str, label: str) -> None:
        """``jz/jnz/jb/jae rel8`` to ``label``."""
        self._emit(bytes([JCC[condition], 0]), f"{condition} {label}")
        self._jumps.append(_Jump(len(self._code) - 1, label))

    def jmp(self, label: str) -> None:
        """``jmp rel8`` to ``label``: EB cb."""
        self._emit(bytes([_JMP_REL8, 0]), f"jmp {label}")
        self._jumps.append(_Jump(len(self._code) - 1, label))

    # --- output ---------------------------------------------------------------------
    def assemble(self) -> bytes:
        """Resolve jumps and return the code.

        Raises:
            AssemblerError: a label is unknown or a jump is out of rel8 range.
        """
        code = bytearray(self._code)
        for jump in self._jumps:
            if jump.label not in self._labels:
                raise AssemblerError(f"unknown label {jump.label!r}")
            rel = self._labels[jump.label] - (jump.offset + 1)
            if not _REL8_MIN <= rel <= _REL8_MAX:
                raise AssemblerError(f"jump to {jump.label!r} out of rel8 range ({rel})")
            code[jump.offset] = rel & 0xFF
        return bytes(code)

    def listing(self) -> str:
        """The program as ``offset  bytes  instruction`` lines (jumps unresolved)."""
        return "\n".join(
            f"{offset:04x}  {data.hex(' '):<30} {text}" for offset, data, text in self._lines
        )
