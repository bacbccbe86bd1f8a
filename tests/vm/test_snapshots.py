"""Stop-and-copy saves and File-backend loads on real KVM guests (SPEC 5, 7, 8, 11)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from squibd.kvm.guest import PROGRESS_BASE, WORKING_SET_BASE
from squibd.snapshot.envelope import read_state_file
from squibd.snapshot.errors import MemoryIo
from squibd.snapshot.manifest import MemoryManifest
from squibd.snapshot.rebase import rebase
from squibd.snapshot.verify import first_difference, verify
from squibd.vm.models import GuestSpec, MemBackend
from squibd.vm.runtime import Runtime

from ._helpers import first_memory_difference, rebase_full_and_diff, wait_progress_beyond

pytestmark = pytest.mark.kvm

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024
CHILD = Path(__file__).with_name("_restore_child.py")
#: The child loads a 64 MiB guest and waits for two heartbeats: bounded generously.
CHILD_TIMEOUT_S = 120


def _manifest(snap: Path) -> MemoryManifest:
    return read_state_file(str(snap)).memory


def _pages(manifest: MemoryManifest) -> set[int]:
    pages: set[int] = set()
    for extent in manifest.extents:
        pages.update(range(extent.offset // PAGE, extent.end // PAGE))
    return pages


def _is_dirty(words: list[np.ndarray] | None, page: int) -> bool:
    assert words is not None
    word, bit = divmod(page, 64)
    return bool((int(words[0][word]) >> bit) & 1)


async def test_full_snapshot_restores_in_a_new_process_and_continues(
    runtime: Runtime, tmp_path: Path
) -> None:
    """I-SNAP-1 (SPEC 11.1): the counters go on from the saved values, not from zero."""
    vm = await runtime.create_vm("snap1", 2, 64, False, GuestSpec("counter"))
    await runtime.start("snap1")
    await wait_progress_beyond(vm, [0, 0])
    snap, mem = tmp_path / "a.snap", tmp_path / "a.mem"
    result = await runtime.save("snap1", "Full", str(snap), str(mem), resume=False)
    saved = vm.guest_progress()
    assert runtime.describe("snap1").state == "Paused"
    assert result.pause_ms > 0 and result.pages_written > 0
    assert first_memory_difference(str(mem), vm) is None
    verify(read_state_file(str(snap)), str(mem), "full")
    await runtime.destroy("snap1")

    child = subprocess.run(
        [sys.executable, str(CHILD), str(snap), str(mem), json.dumps(saved)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen["regs_equal"] is True
    assert seen["memory_difference"] is None
    assert seen["state_before_resume"] == "Paused"
    assert seen["progress_before_run"] == saved
    first, second = seen["progress_after"]
    assert all(f > s > 0 for f, s in zip(first, saved, strict=True))
    assert all(b > a for b, a in zip(second, first, strict=True))
    assert seen["error"] is None


async def test_dirty_log_is_exact_between_checkpoints(runtime: Runtime, tmp_path: Path) -> None:
    """SPEC 11.2: a Diff holds exactly the pages written since the last checkpoint."""
    stride = 4
    ws_mib = 2
    vm = await runtime.create_vm(
        "dirty", 1, 64, True,
        GuestSpec("memwriter", {"working_set_mib": ws_mib, "stride_pages": stride}),
    )  # fmt: skip
    await runtime.start("dirty")
    await wait_progress_beyond(vm, [0])
    await runtime.save("dirty", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"),
                       resume=False)  # fmt: skip
    # Paused since the checkpoint: nothing is dirty.
    idle = await runtime.save("dirty", "Diff", str(tmp_path / "d0.snap"),
                              str(tmp_path / "d0.mem"), resume=False)  # fmt: skip
    assert idle.pages_written == 0
    assert _pages(_manifest(tmp_path / "d0.snap")) == set()

    working_set = range(WORKING_SET_BASE // PAGE, (WORKING_SET_BASE + ws_mib * MIB) // PAGE,
                        stride)  # fmt: skip
    # Each write counts once: wait for more writes than two sweeps of the set.
    await runtime.resume("dirty")
    await wait_progress_beyond(vm, [vm.guest_progress()[0] + 2 * len(working_set)])
    marker = 40 * MIB  # a page the guest never writes: squibd writes it as a device
    await runtime.write_memory("dirty", marker + 8, b"device")
    diff = await runtime.save("dirty", "Diff", str(tmp_path / "d1.snap"),
                              str(tmp_path / "d1.mem"), resume=False)  # fmt: skip
    expected = {PROGRESS_BASE // PAGE, marker // PAGE, *working_set}
    assert _pages(_manifest(tmp_path / "d1.snap")) == expected
    assert diff.pages_written == len(expected)
    assert diff.parent_pair_id == idle.pair_id


async def test_diff_chain_rebases_to_the_full_at_the_last_checkpoint(
    runtime: Runtime, tmp_path: Path
) -> None:
    """SPEC 11.7 on a live guest; the rebased pair loads and runs."""
    vm = await runtime.create_vm(
        "chain", 2, 64, True, GuestSpec("memwriter", {"working_set_mib": 4, "stride_pages": 1})
    )
    await runtime.start("chain")
    await wait_progress_beyond(vm, [0, 0])
    names = ["base", "d1", "d2"]
    for name in names:
        await runtime.save("chain", "Full" if name == "base" else "Diff",
                           str(tmp_path / f"{name}.snap"), str(tmp_path / f"{name}.mem"),
                           resume=name != "d2")  # fmt: skip
        if name != "d2":
            await wait_progress_beyond(vm, vm.guest_progress())
    saved = vm.guest_progress()
    await runtime.save("chain", "Full", str(tmp_path / "full.snap"), str(tmp_path / "full.mem"))
    out_snap, out_mem = tmp_path / "rebased.snap", tmp_path / "rebased.mem"
    rebase(
        str(tmp_path / "base.snap"),
        [str(tmp_path / "d1.snap"), str(tmp_path / "d2.snap")],
        str(out_snap),
        str(out_mem),
        base_mem=str(tmp_path / "base.mem"),
        diff_mems=[str(tmp_path / "d1.mem"), str(tmp_path / "d2.mem")],
    )
    assert first_difference(str(out_mem), str(tmp_path / "full.mem")) is None
    assert first_memory_difference(str(out_mem), vm) is None
    await runtime.destroy("chain")

    restored = await runtime.load("again", str(out_snap), MemBackend("File", str(out_mem)),
                                  track_dirty_pages=True, resume_vm=True)  # fmt: skip
    assert runtime.describe("again").state == "Running"
    await wait_progress_beyond(restored, saved)
    # A Diff after the restore applies to the loaded pair.
    after = await runtime.save("again", "Diff", str(tmp_path / "d3.snap"),
                               str(tmp_path / "d3.mem"))  # fmt: skip
    assert after.parent_pair_id == _manifest(out_snap).pair_id
    assert after.pages_written > 0
    # A Full of the restored VM (its RAM a private mapping of the rebased
    # file plus the pages it wrote since) equals its memory.
    await wait_progress_beyond(restored, restored.guest_progress())
    await runtime.save("again", "Full", str(tmp_path / "f3.snap"), str(tmp_path / "f3.mem"),
                       resume=False)  # fmt: skip
    assert first_memory_difference(str(tmp_path / "f3.mem"), restored) is None
    verify(read_state_file(str(tmp_path / "f3.snap")), str(tmp_path / "f3.mem"), "full")


async def test_load_refuses_a_memory_file_of_another_pair(
    runtime: Runtime, tmp_path: Path
) -> None:
    vm = await runtime.create_vm("pair", 1, 64, False, GuestSpec("counter"))
    await runtime.start("pair")
    await wait_progress_beyond(vm, [0])
    for name in ("a", "b"):
        await runtime.save("pair", "Full", str(tmp_path / f"{name}.snap"),
                           str(tmp_path / f"{name}.mem"))  # fmt: skip
    with pytest.raises(MemoryIo, match="belongs to pair"):
        await runtime.load("wrong", str(tmp_path / "a.snap"),
                           MemBackend("File", str(tmp_path / "b.mem")))  # fmt: skip
    assert "wrong" not in runtime.list()


async def test_save_failing_mid_write_resumes_and_keeps_the_dirty_set(
    runtime: Runtime, tmp_path: Path, small_tmpfs: Path
) -> None:
    vm = await runtime.create_vm(
        "enospc", 1, 64, True, GuestSpec("memwriter", {"working_set_mib": 8, "stride_pages": 1})
    )
    await runtime.start("enospc")
    await wait_progress_beyond(vm, [0])
    await runtime.save("enospc", "Full", str(tmp_path / "f.snap"), str(tmp_path / "f.mem"))
    marker = 40 * MIB
    # A device write larger than the 4 MiB tmpfs: ENOSPC whatever the guest dirtied meanwhile.
    payload = b"written before the failed save".ljust(5 * MIB, b"x")
    await runtime.write_memory("enospc", marker, payload)
    await wait_progress_beyond(vm, vm.guest_progress())

    with pytest.raises(MemoryIo, match=r"No space left on device \(os error 28\)"):
        await runtime.save("enospc", "Diff", str(small_tmpfs / "d.snap"),
                           str(small_tmpfs / "d.mem"))  # fmt: skip
    assert os.listdir(small_tmpfs) == []
    assert runtime.describe("enospc").state == "Running"
    assert _is_dirty(vm.dirty.words(), marker // PAGE)
    await wait_progress_beyond(vm, vm.guest_progress())

    await runtime.save("enospc", "Diff", str(tmp_path / "d.snap"), str(tmp_path / "d.mem"),
                       resume=False)  # fmt: skip
    assert marker // PAGE in _pages(_manifest(tmp_path / "d.snap"))
    assert first_memory_difference(rebase_full_and_diff(tmp_path), vm) is None
