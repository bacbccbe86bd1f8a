"""Rebase (I-SNAP-7), chain checks, SIGKILL safety, ENOSPC, and the CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from squibd.snapshot.bitmap import HOST_PAGE_SIZE, DirtyBitmap
from squibd.snapshot.commit import (
    COMMIT_POINT,
    COMMIT_STEPS,
    PairCancelled,
    PairTransaction,
    recover_pair,
)
from squibd.snapshot.envelope import encode_state, read_state_file
from squibd.snapshot.errors import MemoryIo, SnapshotError
from squibd.snapshot.manifest import MemoryManifest, MemoryRegion
from squibd.snapshot.memerrors import MemoryInputInvalid, MemoryPairMismatch
from squibd.snapshot.memwriter import build_manifest, new_pair_id, set_pair_xattr, write_memory
from squibd.snapshot.rebase import memory_path_for, rebase
from squibd.snapshot.verify import verify
from squibd.vm.memory import GuestMemory
from tests.snapshot._states import minimal_x86_state, minimal_x86_vcpu
from tests.snapshot.memfiles import assert_same_content, small_tmpfs

PAGE = HOST_PAGE_SIZE
MIB = 1024 * 1024
LAYOUT = (MemoryRegion(0, 4 * MIB, 0), MemoryRegion(0x1000_0000, 4 * MIB, 4 * MIB))
REPO = Path(__file__).resolve().parents[2]


@attrs.define(eq=False)
class FakeVm:
    """Guest memory plus dirty bitmaps, saved the way the runtime saves (no vCPUs needed)."""

    memory: GuestMemory
    bitmaps: list[DirtyBitmap]
    last_pair: str | None = None
    saves: int = 0

    @classmethod
    def create(cls) -> FakeVm:
        memory = GuestMemory.shared(LAYOUT)
        return cls(memory, [DirtyBitmap(r.size) for r in memory.regions])

    def write(self, guest_addr: int, data: bytes) -> None:
        self.memory.write(guest_addr, data)
        region = self.memory.region_at(guest_addr, len(data))
        index = self.memory.regions.index(region)
        self.bitmaps[index].mark_addr(guest_addr - region.guest_addr, len(data))

    def save(self, kind: str, snap: Path, *, step_hook: object = None) -> MemoryManifest:
        runs = [b.snapshot_runs() for b in self.bitmaps] if kind == "Diff" else None
        parent = self.last_pair if kind == "Diff" else None
        pair_id = new_pair_id()
        with PairTransaction(str(snap), memory_path_for(str(snap))) as txn:
            result = write_memory(txn.mem_fd, self.memory.regions, kind=kind, runs_per_region=runs)
            set_pair_xattr(txn.mem_fd, pair_id)
            manifest = build_manifest(result, self.memory.regions, kind=kind, pair_id=pair_id,
                                      parent_pair_id=parent)
            self.saves += 1
            state = minimal_x86_state(manifest, (minimal_x86_vcpu(rip=0x1000 + self.saves),))
            txn.commit(encode_state(state))
        for bitmap in self.bitmaps:  # only after the commit
            bitmap.clear()
        self.last_pair = pair_id
        return manifest


@contextlib.contextmanager
def fake_vm() -> Iterator[FakeVm]:
    vm = FakeVm.create()
    try:
        yield vm
    finally:
        vm.memory.close()


def _mem(path: Path) -> Path:
    return Path(memory_path_for(str(path)))


def _temps(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if ".squibd-" in name]


writes = st.lists(
    st.tuples(st.integers(0, 2 * 1024 - 1), st.integers(1, 3), st.integers(1, 255)),
    min_size=1, max_size=12,
)


def _apply(vm: FakeVm, batch: list[tuple[int, int, int]]) -> None:
    for page, npages, value in batch:
        region = LAYOUT[page % 2]
        first = (page // 2) % (region.size // PAGE - npages)
        vm.write(region.guest_addr + first * PAGE, bytes([value]) * npages * PAGE)


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(first=writes, second=writes, third=writes)
def test_rebase_of_full_and_two_diffs_equals_full_at_last_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
    first: list[tuple[int, int, int]],
    second: list[tuple[int, int, int]],
    third: list[tuple[int, int, int]],
) -> None:
    """I-SNAP-7: rebase(Full, Diff1, Diff2) byte-equals a Full taken at Diff2's checkpoint."""
    d = tmp_path_factory.mktemp("rebase")
    with fake_vm() as vm:
        _apply(vm, first)
        vm.save("Full", d / "full.snap")
        _apply(vm, second)
        vm.save("Diff", d / "diff1.snap")
        _apply(vm, third)
        diff2 = vm.save("Diff", d / "diff2.snap")
        reference = vm.save("Full", d / "reference.snap")
    out = rebase(str(d / "full.snap"), [str(d / "diff1.snap"), str(d / "diff2.snap")],
                 str(d / "out.snap"))
    assert_same_content(_mem(d / "out.snap"), _mem(d / "reference.snap"))
    assert out.kind == "Full" and out.parent_pair_id is None
    assert out.pair_id == diff2.pair_id  # same checkpoint: later Diffs still apply
    assert out.extents == reference.extents and out.digests == reference.digests
    state = read_state_file(d / "out.snap")
    assert state.memory == out
    assert state.vcpu_states == read_state_file(d / "diff2.snap").vcpu_states
    verify(state, str(_mem(d / "out.snap")), "full")


def test_rebase_result_accepts_the_next_diff(tmp_path: Path) -> None:
    with fake_vm() as vm:
        vm.write(0, b"a" * PAGE)
        vm.save("Full", tmp_path / "full.snap")
        vm.write(PAGE, b"b" * PAGE)
        vm.save("Diff", tmp_path / "d1.snap")
        rebase(str(tmp_path / "full.snap"), [str(tmp_path / "d1.snap")],
               str(tmp_path / "full.snap"))  # in place
        vm.write(2 * PAGE, b"c" * PAGE)
        vm.save("Diff", tmp_path / "d2.snap")
        vm.save("Full", tmp_path / "ref.snap")
    rebase(str(tmp_path / "full.snap"), [str(tmp_path / "d2.snap")], str(tmp_path / "out.snap"))
    assert_same_content(tmp_path / "out.mem", tmp_path / "ref.mem")
    assert _temps(tmp_path) == []


def test_diff_of_another_parent_is_refused(tmp_path: Path) -> None:
    with fake_vm() as vm:
        vm.save("Full", tmp_path / "full.snap")
        vm.write(0, b"x" * PAGE)
        vm.save("Diff", tmp_path / "d1.snap")
        vm.write(0, b"y" * PAGE)
        vm.save("Diff", tmp_path / "d2.snap")
    with pytest.raises(MemoryPairMismatch, match="applies to pair"):
        rebase(str(tmp_path / "full.snap"), [str(tmp_path / "d2.snap")],
               str(tmp_path / "out.snap"))
    with pytest.raises(MemoryInputInvalid, match="must be a Full"):
        rebase(str(tmp_path / "d1.snap"), [str(tmp_path / "d2.snap")], str(tmp_path / "o.snap"))
    assert not (tmp_path / "out.snap").exists() and _temps(tmp_path) == []


def test_memory_file_of_another_pair_is_refused(tmp_path: Path) -> None:
    with fake_vm() as vm:
        vm.save("Full", tmp_path / "full.snap")
        vm.save("Full", tmp_path / "other.snap")
        vm.write(0, b"x" * PAGE)
        vm.save("Diff", tmp_path / "d1.snap")
    with pytest.raises(MemoryPairMismatch, match="belongs to pair"):
        rebase(str(tmp_path / "other.snap"), [str(tmp_path / "d1.snap")],
               str(tmp_path / "out.snap"), base_mem=str(tmp_path / "full.mem"))


class _FakeEventSetAfter(threading.Event):
    """A cancel event that reads as set from its ``after``-th check on (a fake:
    it lands a cancel between two given pieces of the merge, which a real
    press of Ctrl-C cannot aim at)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after = after
        self.checks = 0

    def is_set(self) -> bool:
        self.checks += 1
        return self.checks > self.after


def test_fake_cancel_at_every_check_of_a_rebase_aborts_or_commits_whole(tmp_path: Path) -> None:
    with fake_vm() as vm:
        vm.write(0, b"a" * 3 * PAGE)
        vm.write(LAYOUT[1].guest_addr, b"b" * PAGE)
        vm.save("Full", tmp_path / "full.snap")
        for page in range(0, 64, 2):  # scattered pages: many pieces to copy and hash
            vm.write(page * PAGE, bytes([page + 1]) * PAGE)
        vm.write(LAYOUT[1].guest_addr + 5 * PAGE, b"c" * 3 * MIB)
        vm.save("Diff", tmp_path / "d1.snap")
        vm.save("Full", tmp_path / "ref.snap")
    out = tmp_path / "out.snap"
    args = (str(tmp_path / "full.snap"), [str(tmp_path / "d1.snap")], str(out))
    cancelled_at = []
    after = 0
    while True:
        cancel = _FakeEventSetAfter(after)
        try:
            rebase(*args, cancel=cancel)
        except PairCancelled:
            assert not out.exists() and not _mem(out).exists() and _temps(tmp_path) == []
            cancelled_at.append(after)
            after += 1
            continue
        break
    assert_same_content(_mem(out), tmp_path / "ref.mem")
    assert _temps(tmp_path) == []
    # Every check before the commit cancelled; the merge itself checks between
    # its pieces, not only at the transaction's named steps.
    assert cancelled_at == list(range(after))
    assert after > COMMIT_STEPS.index(COMMIT_POINT) + 2


_KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    from squibd.snapshot.rebase import rebase

    target = sys.argv[1]

    def hook(step):
        if step == target:
            print(step, flush=True)
            sys.stdin.read()  # parked here until the parent kills us

    rebase(sys.argv[2], [sys.argv[3]], sys.argv[4], step_hook=hook)
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("step", ["temps_created", "mem_synced", "committed", "mem_renamed"])
def test_sigkill_during_rebase_leaves_old_or_new_pair(tmp_path: Path, step: str) -> None:
    assert step in COMMIT_STEPS
    with fake_vm() as vm:
        vm.write(0, b"a" * 3 * PAGE)
        vm.save("Full", tmp_path / "out.snap")  # the output's previous pair
        vm.write(0, b"z" * PAGE)
        vm.save("Full", tmp_path / "full.snap")
        vm.write(PAGE, b"b" * PAGE)
        vm.save("Diff", tmp_path / "d1.snap")
        vm.save("Full", tmp_path / "ref.snap")
    old_state = (tmp_path / "out.snap").read_bytes()
    old_mem = (tmp_path / "out.mem").read_bytes()
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, step, str(tmp_path / "full.snap"),
         str(tmp_path / "d1.snap"), str(tmp_path / "out.snap")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == step
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    recover_pair(str(tmp_path / "out.snap"), str(tmp_path / "out.mem"))
    assert _temps(tmp_path) == []
    if COMMIT_STEPS.index(step) < COMMIT_STEPS.index("committed"):
        assert (tmp_path / "out.snap").read_bytes() == old_state
        assert (tmp_path / "out.mem").read_bytes() == old_mem
    else:
        state = read_state_file(tmp_path / "out.snap")
        verify(state, str(tmp_path / "out.mem"), "full")
        assert_same_content(tmp_path / "out.mem", tmp_path / "ref.mem")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_enospc_save_and_rebase_keep_the_prior_pair(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path, "2m") as small, fake_vm() as vm:
        vm.write(0, b"a" * PAGE)
        vm.save("Full", small / "vm.snap")  # fits
        prior = ((small / "vm.snap").read_bytes(), (small / "vm.mem").read_bytes())
        vm.save("Full", tmp_path / "base.snap")
        vm.write(MIB, b"b" * 3 * MIB)  # more than the tmpfs holds
        with pytest.raises(MemoryIo) as caught:
            vm.save("Full", small / "vm.snap")
        assert str(caught.value) == "memory file I/O error: No space left on device (os error 28)"
        assert _temps(small) == []
        assert ((small / "vm.snap").read_bytes(), (small / "vm.mem").read_bytes()) == prior
        assert vm.bitmaps[0].dirty_count() == 3 * MIB // PAGE  # a failed save keeps every bit
        vm.save("Diff", tmp_path / "d1.snap")
        with pytest.raises(MemoryIo) as caught:
            rebase(str(tmp_path / "base.snap"), [str(tmp_path / "d1.snap")], str(small / "vm.snap"))
        assert "No space left on device (os error 28)" in str(caught.value)
        assert _temps(small) == []
        assert ((small / "vm.snap").read_bytes(), (small / "vm.mem").read_bytes()) == prior


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_rebase_into_a_read_only_filesystem_fails_typed_and_keeps_the_pair(tmp_path: Path
                                                                           ) -> None:
    with small_tmpfs(tmp_path, "16m") as small, fake_vm() as vm:
        vm.write(0, b"a" * PAGE)
        vm.save("Full", small / "vm.snap")
        vm.save("Full", tmp_path / "base.snap")
        vm.write(PAGE, b"b" * PAGE)
        vm.save("Diff", tmp_path / "d1.snap")
        prior = ((small / "vm.snap").read_bytes(), (small / "vm.mem").read_bytes())
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        with pytest.raises(SnapshotError) as caught:
            rebase(str(tmp_path / "base.snap"), [str(tmp_path / "d1.snap")], str(small / "vm.snap"))
        assert "Read-only file system (os error 30)" in str(caught.value)
        assert _temps(small) == []
        assert ((small / "vm.snap").read_bytes(), (small / "vm.mem").read_bytes()) == prior


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "squibd.cli.daemon", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)


def test_cli_rebases_and_reports_errors(tmp_path: Path) -> None:
    with fake_vm() as vm:
        vm.write(0, b"a" * PAGE)
        vm.save("Full", tmp_path / "full.snap")
        vm.write(PAGE, b"b" * PAGE)
        vm.save("Diff", tmp_path / "d1.snap")
        vm.save("Full", tmp_path / "ref.snap")
    ok = _cli("--rebase-snapshot", "--base", str(tmp_path / "full.snap"), "--diff",
              str(tmp_path / "d1.snap"), "--output", str(tmp_path / "out.snap"),
              "--output-memory-file", str(tmp_path / "merged.mem"), "--json", "--verify", "full")
    assert ok.returncode == 0, ok.stderr
    assert '"diffs_merged": 1' in ok.stdout
    assert_same_content(tmp_path / "merged.mem", tmp_path / "ref.mem")
    bad = _cli("--rebase-snapshot", "--base", str(tmp_path / "d1.snap"), "--diff",
               str(tmp_path / "d1.snap"), "--output", str(tmp_path / "x.snap"))
    assert bad.returncode == 1 and "MemoryIo: memory file I/O error" in bad.stderr
    assert _cli("--rebase-snapshot", "--base", "only").returncode == 2
    assert _cli("--rebase-snapshot", "--help").returncode == 0
