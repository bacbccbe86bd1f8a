"""Load refuses another pair's memory file that lost its pair xattr (issue 10).

A plain ``cp`` drops ``user.squibd.pair``; such a memory file is verified in
full against the manifest's digests before any vCPU exists (File backend).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from squibd.snapshot.errors import MemoryIo
from squibd.snapshot.pairing import read_pair_xattr
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime

from ._helpers import first_memory_difference, wait_progress_beyond

pytestmark = pytest.mark.kvm


async def test_load_verifies_a_memory_file_without_the_pair_xattr(
    runtime: Runtime, tmp_path: Path
) -> None:
    vm = await runtime.create_vm("src", 1, 64, False, GuestSpec("counter"))
    await runtime.start("src")
    await wait_progress_beyond(vm, [0])
    await runtime.save("src", "Full", str(tmp_path / "a.snap"), str(tmp_path / "a.mem"))
    await wait_progress_beyond(vm, vm.guest_progress())  # pair B has other counters
    await runtime.save("src", "Full", str(tmp_path / "b.snap"), str(tmp_path / "b.mem"))
    await runtime.destroy("src")
    if read_pair_xattr(str(tmp_path / "a.mem")) is None:
        pytest.skip("this filesystem keeps no user xattrs")

    # B's memory file, copied without its xattr next to A's state: refused.
    shutil.copyfile(tmp_path / "b.mem", tmp_path / "stray.mem")
    assert read_pair_xattr(str(tmp_path / "stray.mem")) is None
    with pytest.raises(MemoryIo, match=r"no user\.squibd\.pair xattr and does not match"):
        await runtime.load("wrong", str(tmp_path / "a.snap"),
                           MemBackend("File", str(tmp_path / "stray.mem")))  # fmt: skip
    assert "wrong" not in runtime.list()

    # A genuine copy of A's own memory file (no xattr either): verified, then loaded.
    shutil.copyfile(tmp_path / "a.mem", tmp_path / "copy.mem")
    restored = await runtime.load("right", str(tmp_path / "a.snap"),
                                  MemBackend("File", str(tmp_path / "copy.mem")))  # fmt: skip
    assert runtime.describe("right").state == "Paused"
    assert first_memory_difference(str(tmp_path / "copy.mem"), restored) is None
    await runtime.resume("right")
    await wait_progress_beyond(restored, restored.guest_progress())
