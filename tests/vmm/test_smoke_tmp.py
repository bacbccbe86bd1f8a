from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime
from tests.vm._helpers import first_memory_difference, wait_progress_beyond

pytestmark = pytest.mark.kvm


async def test_smoke(tmp_path: Path) -> None:
    rt = Runtime(quiesce_timeout_s=30, vm_isolation="process")
    try:
        vm = await rt.create_vm("a", 2, 64, True, GuestSpec("counter"))
        d = rt.describe("a")
        assert d.process_id != os.getpid()
        await rt.start("a")
        await wait_progress_beyond(vm, [0, 0])
        await rt.pause("a")
        await rt.resume("a")
        r = await rt.save("a", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"), resume=False)
        assert first_memory_difference(str(tmp_path / "f.mem"), vm) is None
        await rt.resume("a")
        await wait_progress_beyond(vm, vm.guest_progress())
        r = await rt.save("a", "Diff", str(tmp_path / "d.snap"), str(tmp_path / "d.mem"), resume=True)
        print(r)
        saved = None
        await rt.destroy("a")
        vm2 = await rt.load("b", str(tmp_path / "f.snap"), MemBackend("File", str(tmp_path / "f.mem")), resume_vm=True)
        p = vm2.guest_progress()
        await wait_progress_beyond(vm2, p)
        r = await rt.save("b", "Full", str(tmp_path / "g.snap"), str(tmp_path / "g.mem"), resume=False)
        # the shadow equals the process memory
        assert vm2.read_memory(0x20000, 8) == open(tmp_path / "g.mem", "rb").read()[0x20000:0x20008]
        print(await rt.describe_current("b"))
    finally:
        await rt.aclose()
