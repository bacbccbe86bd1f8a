"""The compatibility check of SPEC section 3: Incompatible with a detail naming the problem."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest

from squibd.snapshot.compat import MAX_VCPUS, check_compatible
from squibd.snapshot.errors import Incompatible
from squibd.snapshot.manifest import KIND_DIFF, Extent, MemoryRegion
from squibd.snapshot.models import DeviceState, SysReg
from tests.snapshot._states import sample_aarch64_state, sample_manifest, sample_x86_state

X86 = sample_x86_state(2, 2)
ARM = sample_aarch64_state(2, 2)


def vcpu0(state: Any, **changes: Any) -> Any:
    first = attrs.evolve(state.vcpu_states[0], **changes)
    return attrs.evolve(state, vcpu_states=(first, *state.vcpu_states[1:]))


def sregs0(state: Any, **changes: Any) -> Any:
    return vcpu0(state, sregs=attrs.evolve(state.vcpu_states[0].sregs, **changes))


def info(state: Any, **changes: Any) -> Any:
    return attrs.evolve(state, vm_info=attrs.evolve(state.vm_info, **changes))


def memory(state: Any, **changes: Any) -> Any:
    return attrs.evolve(state, memory=attrs.evolve(state.memory, **changes))


def test_sample_states_are_compatible() -> None:
    for state in (X86, ARM, sample_x86_state(MAX_VCPUS, 1), sample_aarch64_state(1, 1)):
        check_compatible(state)


CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("no vcpus", lambda: attrs.evolve(info(X86, vcpu_count=0), vcpu_states=()), "vcpu_count is 0"),
    ("33 vcpus", lambda: info(sample_x86_state(MAX_VCPUS, 1), vcpu_count=33), "vcpu_count is 33"),
    ("count mismatch", lambda: info(X86, vcpu_count=3), "2 vCPU states for vm_info.vcpu_count 3"),
    ("smt", lambda: info(X86, smt=True), "smt is true"),
    ("short lapic", lambda: vcpu0(X86, lapic=b"\0" * 512), "vcpu_states.0.lapic is 512 bytes"),
    ("small xsave", lambda: vcpu0(X86, xsave=b"\0" * 512), "vcpu_states.0.xsave is 512 bytes"),
    ("events", lambda: vcpu0(X86, vcpu_events=b""), "vcpu_states.0.vcpu_events is 0 bytes"),
    ("no cpuid", lambda: vcpu0(X86, cpuid=()), "vcpu_states.0.cpuid is empty"),
    ("bitmap", lambda: sregs0(X86, interrupt_bitmap=(0,)), "interrupt_bitmap has 1 words"),
    ("duplicate msr", lambda: vcpu0(X86, msrs=X86.vcpu_states[0].msrs[:1] * 2), "MSR index twice"),
    ("pit", lambda: attrs.evolve(X86, vm_state=attrs.evolve(X86.vm_state, pit=b"\0")),
     "vm_state.pit is 1 bytes"),
    ("empty gic", lambda: attrs.evolve(ARM, vm_state=attrs.evolve(ARM.vm_state, gic_blob=b"")),
     "gic_blob is empty"),
    ("x30 missing", lambda: vcpu0(ARM, x=(0,) * 30), "vcpu_states.0.x has 30 registers"),
    ("v narrow", lambda: vcpu0(ARM, v=(b"\0" * 8,) * 32), "vcpu_states.0.v.0 is 8 bytes"),
    ("no sysregs", lambda: vcpu0(ARM, sys_regs=()), "sys_regs is empty"),
    ("dup sysreg", lambda: vcpu0(ARM, sys_regs=(SysReg(1, 0), SysReg(1, 1))), "register id twice"),
    ("psci", lambda: vcpu0(ARM, psci_state="Asleep"), "psci_state is 'Asleep'"),
    ("unsorted devices", lambda: attrs.evolve(X86, device_states=X86.device_states[::-1]),
     "not sorted by (mmio_slot, id)"),
    ("duplicate device", lambda: attrs.evolve(X86, device_states=(
        DeviceState("a", "x", 0, b""), DeviceState("a", "x", 0, b""))), "twice"),
    ("memory size", lambda: info(X86, mem_size_mib=3), "but vm_info.mem_size_mib is 3"),
    ("file size", lambda: memory(X86, file_size=1), "memory.file_size 1"),
    ("page size", lambda: memory(X86, page_size=3000), "page_size 3000 is not a power of two"),
    ("kind", lambda: memory(X86, kind="Half"), "memory.kind is 'Half'"),
    ("diff parent", lambda: memory(X86, kind=KIND_DIFF), "parent_pair_id is missing"),
    ("pair id", lambda: memory(X86, pair_id=""), "pair_id is empty"),
    ("region gap", lambda: memory(X86, regions=(MemoryRegion(0, 2**20, 0),
                                                 MemoryRegion(2**21, 2**20, 2**21))),
     "regions.1.file_offset"),
    ("extent beyond", lambda: memory(X86, extents=(Extent(0, 2**30),)), "extents.0"),
    ("digests", lambda: memory(X86, digests=b""), "memory.digests holds 0 bytes, expected 1 x 8"),
    ("algorithm", lambda: memory(X86, digest_algorithm="md5"), "'md5' is unknown"),
    ("chunk", lambda: memory(X86, chunk_size=0), "chunk_size 0"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "detail"), CASES, ids=[c[0] for c in CASES])
def test_incompatible_names_the_problem(name: str, build: Callable[[], Any], detail: str) -> None:
    with pytest.raises(Incompatible) as raised:
        check_compatible(build())
    assert detail in str(raised.value.detail)
    assert str(raised.value) == (
        "snapshot is from a different VMM (sysreg or GIC blob shape mismatch)"
    )


def test_lapic_may_be_empty_only_without_an_irqchip() -> None:
    no_chip = attrs.evolve(X86, vm_state=attrs.evolve(X86.vm_state, irqchips=(), pit=None))
    check_compatible(no_chip)
    empty = tuple(attrs.evolve(v, lapic=b"") for v in X86.vcpu_states)
    check_compatible(attrs.evolve(no_chip, vcpu_states=empty))
    with pytest.raises(Incompatible) as raised:
        check_compatible(attrs.evolve(X86, vcpu_states=empty))
    assert "vcpu_states.0.lapic is 0 bytes, expected 1024" in str(raised.value.detail)


def test_x86_split_memory_layout_is_compatible() -> None:
    # RAM split around an MMIO gap: two regions, contiguous in the file.
    mib = 2**20
    manifest = attrs.evolve(
        sample_manifest(4),
        regions=(MemoryRegion(0, 3 * mib, 0), MemoryRegion(2**32, mib, 3 * mib)),
    )
    check_compatible(attrs.evolve(info(X86, mem_size_mib=4), memory=manifest))
