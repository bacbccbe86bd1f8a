"""The ctypes layouts and ioctl numbers of squibd.kvm._abi against the kernel headers.

A C program compiled with gcc prints sizeof/offsetof of every struct and
field squibd uses, every ioctl number and constant; each is compared with
the Python value. Skips only when gcc or the KVM headers are missing.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from squibd.kvm import _abi

HEADERS = (Path("/usr/include/linux/kvm.h"), Path("/usr/include/x86_64-linux-gnu/asm/kvm.h"))

# ctypes class -> C struct name (header-only classes stand for the struct without its array).
STRUCTS: dict[type[ctypes.Structure], str] = {
    _abi.KvmUserspaceMemoryRegion: "kvm_userspace_memory_region",
    _abi.KvmRegs: "kvm_regs",
    _abi.KvmSegment: "kvm_segment",
    _abi.KvmDtable: "kvm_dtable",
    _abi.KvmSregs: "kvm_sregs",
    _abi.KvmCpuidEntry2: "kvm_cpuid_entry2",
    _abi.KvmCpuid2Header: "kvm_cpuid2",
    _abi.KvmMsrEntry: "kvm_msr_entry",
    _abi.KvmMsrsHeader: "kvm_msrs",
    _abi.KvmMsrListHeader: "kvm_msr_list",
    _abi.KvmXcr: "kvm_xcr",
    _abi.KvmXcrs: "kvm_xcrs",
    _abi.KvmDebugregs: "kvm_debugregs",
    _abi.KvmMpState: "kvm_mp_state",
    _abi.KvmClockData: "kvm_clock_data",
    _abi.KvmIrqchip: "kvm_irqchip",
    _abi.KvmPitConfig: "kvm_pit_config",
    _abi.KvmDirtyLog: "kvm_dirty_log",
    _abi.KvmClearDirtyLog: "kvm_clear_dirty_log",
    _abi.KvmEnableCap: "kvm_enable_cap",
    _abi.KvmDirtyGfn: "kvm_dirty_gfn",
}
OPAQUE_SIZES = {
    "kvm_lapic_state": _abi.KVM_LAPIC_STATE_SIZE,
    "kvm_vcpu_events": _abi.KVM_VCPU_EVENTS_SIZE,
    "kvm_pit_state2": _abi.KVM_PIT_STATE2_SIZE,
    "kvm_xsave": _abi.KVM_XSAVE_SIZE,
}
# kvm_run: (C member path, Python offset, Python size); the kernel's exit union is anonymous.
_RUN = _abi.KvmRun
_EXIT = _RUN.exit.offset
KVM_RUN_FIELDS = [
    ("request_interrupt_window", _RUN.request_interrupt_window.offset, 1),
    ("immediate_exit", _RUN.immediate_exit.offset, 1),
    ("exit_reason", _RUN.exit_reason.offset, 4),
    ("ready_for_interrupt_injection", _RUN.ready_for_interrupt_injection.offset, 1),
    ("if_flag", _RUN.if_flag.offset, 1),
    ("flags", _RUN.flags.offset, 2),
    ("cr8", _RUN.cr8.offset, 8),
    ("apic_base", _RUN.apic_base.offset, 8),
    *[
        (f"io.{f}", _EXIT + getattr(_abi.KvmRunIo, f).offset, getattr(_abi.KvmRunIo, f).size)
        for f in ("direction", "size", "port", "count", "data_offset")
    ],
    *[
        (f"fail_entry.{f}", _EXIT + getattr(_abi.KvmRunFailEntry, f).offset,
         getattr(_abi.KvmRunFailEntry, f).size)
        for f in ("hardware_entry_failure_reason", "cpu")
    ],
    *[
        (f"mmio.{f}", _EXIT + getattr(_abi.KvmRunMmio, f).offset, getattr(_abi.KvmRunMmio, f).size)
        for f in ("phys_addr", "data", "len", "is_write")
    ],
    *[
        (f"internal.{f}", _EXIT + getattr(_abi.KvmRunInternal, f).offset,
         getattr(_abi.KvmRunInternal, f).size)
        for f in ("suberror", "ndata", "data")
    ],
]  # fmt: skip
CONSTANTS = {
    "KVM_API_VERSION": _abi.KVM_API_VERSION,
    "KVM_MEM_LOG_DIRTY_PAGES": _abi.KVM_MEM_LOG_DIRTY_PAGES,
    "KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE": _abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    "KVM_MP_STATE_RUNNABLE": _abi.KVM_MP_STATE_RUNNABLE,
    "KVM_DIRTY_GFN_F_DIRTY": _abi.KVM_DIRTY_GFN_F_DIRTY,
    "KVM_DIRTY_GFN_F_RESET": _abi.KVM_DIRTY_GFN_F_RESET,
    "KVM_DIRTY_LOG_PAGE_OFFSET": _abi.KVM_DIRTY_LOG_PAGE_OFFSET,
    "KVM_EXIT_IO_IN": _abi.KVM_EXIT_IO_IN,
    "KVM_EXIT_IO_OUT": _abi.KVM_EXIT_IO_OUT,
    "KVM_NR_INTERRUPTS": _abi.KVM_NR_INTERRUPTS,
    "KVM_MAX_XCRS": _abi.KVM_MAX_XCRS,
    **_abi.CAPABILITIES,
    **{name: number for number, name in _abi.EXIT_REASONS.items()},
}


def _c_program() -> tuple[str, list[tuple[str, int]]]:
    """C source printing one ``name value`` line per check, and the expected values."""
    checks: list[tuple[str, str, int]] = []  # (label, C expression, expected)
    for cls, cname in STRUCTS.items():
        checks.append((f"sizeof {cname}", f"sizeof(struct {cname})", ctypes.sizeof(cls)))
        for field in cls._fields_:
            name = field[0]
            descr = getattr(cls, name)
            checks.append(
                (f"offsetof {cname}.{name}", f"offsetof(struct {cname}, {name})", descr.offset)
            )
            checks.append(
                (f"sizeof {cname}.{name}", f"sizeof(((struct {cname} *)0)->{name})", descr.size)
            )
    for cname, size in OPAQUE_SIZES.items():
        checks.append((f"sizeof {cname}", f"sizeof(struct {cname})", size))
    for path, offset, size in KVM_RUN_FIELDS:
        checks.append((f"offsetof kvm_run.{path}", f"offsetof(struct kvm_run, {path})", offset))
        checks.append((f"sizeof kvm_run.{path}", f"sizeof(((struct kvm_run *)0)->{path})", size))
    for name, value in _abi.IOCTLS.items():
        checks.append((name, f"(unsigned long long)({name})", value))
    for name, value in CONSTANTS.items():
        checks.append((name, f"(unsigned long long)({name})", value))
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void) {",
    ]
    lines += [f'  printf("%llu\\n", (unsigned long long)({expr}));' for _, expr, _ in checks]
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n", [(label, expected) for label, _, expected in checks]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, int, int]]:
    gcc = shutil.which("gcc")
    if gcc is None or not all(h.exists() for h in HEADERS):
        pytest.skip("gcc or the KVM headers (linux/kvm.h, asm/kvm.h) are missing")
    source, expected = _c_program()
    tmp = tmp_path_factory.mktemp("abi")
    (tmp / "abi.c").write_text(source)
    subprocess.run([gcc, "-o", str(tmp / "abi"), str(tmp / "abi.c")], check=True)
    out = subprocess.run([str(tmp / "abi")], check=True, capture_output=True, text=True).stdout
    values = [int(v) for v in out.split()]
    assert len(values) == len(expected)
    return [(label, want, got) for (label, want), got in zip(expected, values, strict=True)]


def test_every_struct_field_ioctl_and_constant_matches_the_headers(
    header_values: list[tuple[str, int, int]],
) -> None:
    mismatches = [f"{label}: python {want} != C {got}" for label, want, got in header_values
                  if want != got]  # fmt: skip
    assert not mismatches, "\n".join(mismatches)


def test_the_check_covers_every_ioctl_squibd_uses(
    header_values: list[tuple[str, int, int]],
) -> None:
    labels = {label for label, _, _ in header_values}
    assert set(_abi.IOCTLS) <= labels
    assert {"KVM_RUN", "KVM_GET_XSAVE2", "KVM_CLEAR_DIRTY_LOG", "KVM_RESET_DIRTY_RINGS"} <= labels
    assert len(header_values) > 200


def test_ioctl_with_an_unsigned_argument_above_int_max_reaches_the_kernel() -> None:
    # fcntl.ioctl would overflow a signed int here; a bad fd shows the call went through.
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        result, err = _abi.ioctl_raw(fd, _abi.KVM_SET_TSS_ADDR, 0xFFFB_D000)
    finally:
        os.close(fd)
    assert result == -1
    assert err != 0
