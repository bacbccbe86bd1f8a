"""Built-in guest programs: encodings, layout and parameters (no KVM needed)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.kvm import GuestProgramError, build_guest, guest, layout, programs, progress_addr
from squibd.kvm._asm import Assembler, AssemblerError
from squibd.vm.memory import GuestMemory

# Checked once with objdump -D -b binary -mi386:x86-64 at development time.
COUNTER_CODE = bytes.fromhex(
    "48ff07f707ffff000075f5488b064885c0740c48c7060000000066bae100eef707ffffff0075d966bae000eeebd2"
)


class _Ram:
    """A bytearray with the GuestMemory calls build_guest uses (pure: no mapping)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    @property
    def total_size(self) -> int:
        return len(self.data)

    def write(self, guest_addr: int, data: bytes) -> None:
        self.data[guest_addr : guest_addr + len(data)] = data

    def read(self, guest_addr: int, length: int) -> bytes:
        return bytes(self.data[guest_addr : guest_addr + length])


def test_counter_program_bytes_match_the_checked_encoding() -> None:
    assert programs.counter_program().assemble() == COUNTER_CODE


@pytest.mark.parametrize(
    ("emit", "expected"),
    [
        (lambda a: a.inc_mem64("rdi"), "48ff07"),
        (lambda a: a.store64("r11", "rax"), "498903"),
        (lambda a: a.add_rr("r11", "r10"), "4d01d3"),
        (lambda a: a.cmp_rr("rax", "r14"), "4c39f0"),
        (lambda a: a.lea_sum("r14", "rax", "r13"), "4e8d3428"),
        (lambda a: a.shl_imm("rdx", 32), "48c1e220"),
        (lambda a: a.mov_dx_imm(0xE1), "66bae100"),
        (lambda a: a.rdtsc(), "0f31"),
    ],
)
def test_instruction_encodings(emit: object, expected: str) -> None:
    asm = Assembler()
    emit(asm)  # type: ignore[operator]
    assert asm.assemble().hex() == expected


def test_assembler_rejects_unknown_label_and_far_jump() -> None:
    asm = Assembler()
    asm.jmp("nowhere")
    with pytest.raises(AssemblerError, match="nowhere"):
        asm.assemble()
    far = Assembler()
    far.label("top")
    for _ in range(70):
        far.rdtsc()
    far.jmp("top")
    with pytest.raises(AssemblerError, match="rel8"):
        far.assemble()


def test_page_tables_identity_map_with_accessed_and_dirty_preset() -> None:
    ram = _Ram(2 << 20)
    build_guest(ram, "counter", {}, 1)
    pml4 = struct.unpack_from("<Q", ram.data, layout.PML4_ADDR)[0]
    assert pml4 & ~0xFFF == layout.PDPT_ADDR
    pd0 = struct.unpack_from("<512Q", ram.data, layout.PD_ADDR)
    for i, entry in enumerate(pd0):
        assert entry & ~0xFFF == i << 21
        assert entry & 0xE7 == 0xE7  # P RW US A D PS


def test_tss_allows_every_port() -> None:
    tss = layout.tss_bytes()
    iomap = struct.unpack_from("<H", tss, 0x66)[0]
    assert set(tss[iomap:-1]) == {0}
    assert tss[-1] == 0xFF


def test_gdt_user_code_descriptor_is_64_bit_ring_3() -> None:
    gdt = layout.gdt_bytes()
    code = struct.unpack_from("<Q", gdt, layout.USER_CODE_SELECTOR & ~3)[0]
    assert (code >> 45) & 3 == 3  # DPL
    assert (code >> 53) & 1 == 1  # L


def test_progress_addresses_are_per_vcpu_pages() -> None:
    addrs = [progress_addr("counter", {}, i) for i in range(32)]
    assert len({a // 4096 for a in addrs}) == 32
    assert addrs[0] == guest.PROGRESS_BASE


@pytest.mark.parametrize(
    ("program", "params", "match"),
    [
        ("bogus", {}, "unknown guest program"),
        ("counter", {"x": 1}, "no parameters"),
        ("memwriter", {"working_set_mib": 0}, "working_set_mib >= 1"),
        ("memwriter", {"colour": 1}, "colour"),
        ("memwriter", {"working_set_mib": 64}, "does not fit"),
    ],
)
def test_bad_programs_and_parameters_are_value_errors(
    program: str, params: dict[str, int], match: str
) -> None:
    with pytest.raises(GuestProgramError, match=match) as info:
        build_guest(_Ram(8 << 20), program, params, 1)
    assert isinstance(info.value, ValueError)


def test_vcpu_count_above_32_is_refused() -> None:
    with pytest.raises(GuestProgramError, match="1 to 32"):
        build_guest(_Ram(2 << 20), "counter", {}, 33)


@settings(max_examples=40, deadline=None)
@given(
    ws=st.integers(min_value=1, max_value=6),
    stride=st.integers(min_value=1, max_value=600),
    vcpus=st.integers(min_value=1, max_value=4),
)
def test_memwriter_written_pages_and_registers_agree(ws: int, stride: int, vcpus: int) -> None:
    ram = _Ram(8 << 20)
    image = build_guest(ram, "memwriter", {"working_set_mib": ws, "stride_pages": stride}, vcpus)
    pages = image.written_pages()
    ws_pages = {p for p in pages if p >= guest.WORKING_SET_BASE // 4096}
    assert len(ws_pages) == -(-ws * 256 // stride)
    assert min(ws_pages) == guest.WORKING_SET_BASE // 4096
    for i, regs in enumerate(image.regs):
        assert regs.r8 == guest.WORKING_SET_BASE + 8 * i
        assert regs.r10 == stride * 4096
        assert regs.r9 == guest.WORKING_SET_BASE + ws * (1 << 20)
        assert regs.rdi == image.progress_addr(i)
        assert regs.rflags == layout.RFLAGS


def test_build_guest_on_real_guest_memory_writes_code_and_zero_progress() -> None:
    with GuestMemory.create(4) as memory:
        memory.write(guest.PROGRESS_BASE, b"\xff" * 8)
        image = build_guest(memory, "counter", {}, 2)
        assert memory.read(guest.CODE_ADDR, len(COUNTER_CODE)) == COUNTER_CODE
        assert image.read_progress(memory) == [0, 0]
