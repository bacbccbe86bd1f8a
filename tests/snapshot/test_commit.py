"""The pair commit and its recovery (SPEC section 5, invariant 4 as far as files go)."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from squibd.snapshot import commit as commit_module
from squibd.snapshot.commit import (
    COMMIT_STEPS,
    JOURNAL_MARKER,
    PairCancelled,
    PairTransaction,
    recover_directory,
    recover_pair,
)
from squibd.snapshot.envelope import encode_state, read_state_file
from squibd.snapshot.errors import (
    AtomicCommitCrossFs,
    AtomicCommitFailed,
    Incompatible,
    InvalidPath,
    Io,
    MemoryIo,
)
from squibd.snapshot.journal import (
    TEMP_MARKER,
    JournalPlan,
    RecoveryOutcome,
    canonical_path,
    commit_record,
    journal_name,
    recover_all,
    release_paths,
    reserve_paths,
    temp_path_for,
)
from squibd.snapshot.statedir import StateDir, configure_state_dir
from tests.snapshot._states import sample_manifest, sample_x86_state

OLD_MEM = b"old memory page " * 512
NEW_MEM = b"NEW" * 5000
OLD_STATE = encode_state(sample_x86_state(1, 1, manifest=sample_manifest(1, pair_id="old")))
NEW_STATE = encode_state(sample_x86_state(2, 1, manifest=sample_manifest(1, pair_id="new")))
#: The first step after which the new pair must win.
COMMIT_POINT = COMMIT_STEPS.index("committed")


@pytest.fixture(autouse=True)
def state(tmp_path: Path) -> Iterator[StateDir]:
    """A private state directory for this test (forked children inherit it)."""
    opened = configure_state_dir(str(tmp_path / "state"))
    assert opened is not None
    try:
        yield opened
    finally:
        configure_state_dir(None)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    (tmp_path / "d").mkdir()
    return str(tmp_path / "d" / "vm.snap"), str(tmp_path / "d" / "vm.mem")


def journals(state: StateDir) -> list[str]:
    return sorted(os.listdir(state.journal_dir))


def write_old_pair(snap: str, mem: str) -> None:
    Path(snap).write_bytes(OLD_STATE)
    Path(mem).write_bytes(OLD_MEM)


def save(snap: str, mem: str, **kwargs: object) -> None:
    with PairTransaction(snap, mem, **kwargs) as tx:  # type: ignore[arg-type]
        os.pwrite(tx.mem_fd, NEW_MEM, 0)
        tx.commit(NEW_STATE)


def pair_bytes(snap: str, mem: str) -> tuple[bytes | None, bytes | None]:
    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if os.path.lexists(path) else None

    return read(snap), read(mem)


def leftovers(*directories: str) -> list[str]:
    """squibd's temp files in ``directories`` and journals in the state directory."""
    from squibd.snapshot.statedir import current_state_dir

    return sorted(
        [name for directory in directories for name in os.listdir(directory)
         if ".squibd-" in name] + os.listdir(current_state_dir().journal_dir)
    )  # fmt: skip


def test_save_puts_the_new_pair_in_place_with_no_temps(pair: tuple[str, str]) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    save(snap, mem)
    assert pair_bytes(snap, mem) == (NEW_STATE, NEW_MEM)
    assert read_state_file(snap).memory.pair_id == "new"
    assert leftovers(os.path.dirname(snap)) == []
    assert stat.S_IMODE(os.stat(snap).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(mem).st_mode) == 0o600


def test_temps_are_beside_the_destinations_with_mode_0600(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    (tmp_path / "m").mkdir()
    snap, mem = str(tmp_path / "s" / "a.snap"), str(tmp_path / "m" / "a.mem")
    with PairTransaction(snap, mem) as tx:
        assert os.path.dirname(tx.mem_tmp_path) == str(tmp_path / "m")
        assert os.path.dirname(tx.state_tmp_path) == str(tmp_path / "s")
        for path in (tx.mem_tmp_path, tx.state_tmp_path):
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        other = PairTransaction(str(tmp_path / "s" / "b.snap"), str(tmp_path / "m" / "b.mem"))
        assert other.mem_tmp_path != tx.mem_tmp_path  # unique names
        other.abort()
    assert leftovers(str(tmp_path / "s"), str(tmp_path / "m")) == []


def test_commit_sizes_the_memory_file_and_keeps_its_xattr(pair: tuple[str, str]) -> None:
    snap, mem = pair
    with PairTransaction(snap, mem) as tx:
        os.pwrite(tx.mem_fd, b"x", 0)
        try:
            os.setxattr(tx.mem_fd, "user.squibd.pair", b"new")
        except OSError as exc:
            pytest.skip(f"no user xattrs here: {exc}")
        tx.commit(NEW_STATE, mem_size=1 << 20)
    assert os.path.getsize(mem) == 1 << 20
    assert os.getxattr(mem, "user.squibd.pair") == b"new"


def test_exit_without_commit_aborts_and_keeps_the_old_pair(pair: tuple[str, str]) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    with PairTransaction(snap, mem) as tx:
        os.pwrite(tx.mem_fd, NEW_MEM, 0)
    assert pair_bytes(snap, mem) == (OLD_STATE, OLD_MEM)
    assert leftovers(os.path.dirname(snap)) == []


@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_cancel_aborts_before_the_commit_point_and_is_ignored_after(
    pair: tuple[str, str], step: str
) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    cancel = threading.Event()

    def press_cancel(name: str) -> None:
        if name == step:
            cancel.set()

    if COMMIT_STEPS.index(step) < COMMIT_POINT:
        with pytest.raises(PairCancelled):
            save(snap, mem, cancel=cancel, step_hook=press_cancel)
        assert pair_bytes(snap, mem) == (OLD_STATE, OLD_MEM)
    else:  # the commit record is durable: the new pair wins, no error
        save(snap, mem, cancel=cancel, step_hook=press_cancel)
        assert pair_bytes(snap, mem) == (NEW_STATE, NEW_MEM)
    assert cancel.is_set()
    assert leftovers(os.path.dirname(snap)) == []


def test_the_memory_writer_stops_at_check_cancelled(pair: tuple[str, str]) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    cancel = threading.Event()
    written = 0
    with pytest.raises(PairCancelled), PairTransaction(snap, mem, cancel=cancel) as tx:
        for piece in range(4):
            tx.check_cancelled()
            os.pwrite(tx.mem_fd, NEW_MEM, piece * len(NEW_MEM))
            written += 1
            if piece == 1:
                cancel.set()
    assert written == 2
    assert pair_bytes(snap, mem) == (OLD_STATE, OLD_MEM)
    assert leftovers(os.path.dirname(snap)) == []


def test_prior_pair_survives_a_save_that_fails_validation(pair: tuple[str, str]) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    broken = sample_x86_state(1, 3, manifest=sample_manifest(1))  # manifest != mem_size_mib
    with pytest.raises(Incompatible), PairTransaction(snap, mem) as tx:
        os.pwrite(tx.mem_fd, NEW_MEM, 0)
        tx.commit(encode_state(broken))
    assert pair_bytes(snap, mem) == (OLD_STATE, OLD_MEM)
    assert leftovers(os.path.dirname(snap)) == []


@pytest.mark.parametrize(
    ("snap", "mem"),
    [("/tmp/x/a.snap", "/tmp/x/a.snap"), ("/tmp/x/a.snap", "/tmp/x/./a.snap"),
     ("relative.snap", "/tmp/a.mem"), ("/tmp/a.snap", "/tmp/../a.mem")],
)  # fmt: skip
def test_invalid_or_identical_paths_are_refused(snap: str, mem: str) -> None:
    with pytest.raises(InvalidPath):
        PairTransaction(snap, mem)


def test_same_file_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    with pytest.raises(InvalidPath, match="must be different files"):
        PairTransaction(str(tmp_path / "real" / "a"), str(tmp_path / "alias" / "a"))
    assert os.listdir(tmp_path / "real") == []


def test_planted_symlink_at_a_temp_path_is_never_followed(pair: tuple[str, str],
                                                          state: StateDir) -> None:  # fmt: skip
    snap, mem = pair
    directory = os.path.dirname(snap)
    victim = Path(directory) / "victim"
    victim.write_bytes(b"precious")

    def plant(step: str) -> None:
        if step == "journal_created":  # txid known, temps not yet created
            (journal,) = journals(state)
            txid = journal.split(".")[1]
            os.symlink(victim, os.path.join(directory, f".vm.snap.squibd-tmp-state.{txid}"))

    with pytest.raises(Io, match=r"File exists \(os error 17\)"):
        PairTransaction(snap, mem, step_hook=plant)
    assert victim.read_bytes() == b"precious"
    (planted,) = leftovers(directory)  # our journal is gone; the planted link is not ours
    assert os.path.islink(os.path.join(directory, planted))


def test_planted_symlink_at_the_memory_temp_is_a_memory_io_error(
    pair: tuple[str, str], state: StateDir
) -> None:
    snap, mem = pair
    directory = os.path.dirname(snap)
    victim = Path(directory) / "victim"
    victim.write_bytes(b"precious")

    def plant(step: str) -> None:
        if step == "journal_prepared":
            (journal,) = journals(state)
            txid = journal.split(".")[1]
            os.symlink(victim, os.path.join(directory, f".vm.mem.squibd-tmp-mem.{txid}"))

    with pytest.raises(MemoryIo, match="os error 17"):
        PairTransaction(snap, mem, step_hook=plant)
    assert victim.read_bytes() == b"precious"
    assert len(leftovers(directory)) == 1  # only the planted link; the state temp was removed


def test_a_symlink_at_the_destination_is_refused_before_any_write(pair: tuple[str, str]) -> None:
    snap, mem = pair
    victim = Path(os.path.dirname(snap)) / "victim"
    victim.write_bytes(b"precious")
    os.symlink(victim, snap)
    with pytest.raises(InvalidPath, match="snapshot_path exists and is a symbolic link"):
        save(snap, mem)
    assert os.path.islink(snap)
    assert victim.read_bytes() == b"precious"
    assert not os.path.exists(mem)
    assert leftovers(os.path.dirname(snap)) == []


def test_a_second_save_of_the_same_paths_is_busy(pair: tuple[str, str]) -> None:
    snap, mem = pair
    with PairTransaction(snap, mem):
        with pytest.raises(Io) as info:
            PairTransaction(snap, str(Path(mem).with_suffix(".other")))
        assert info.value.errno == errno.EBUSY
    save(snap, mem)  # free again afterwards


@pytest.mark.parametrize("which", ["snap", "mem"])
def test_a_directory_destination_is_refused_before_any_write(pair: tuple[str, str],
                                                             which: str) -> None:  # fmt: skip
    snap, mem = pair
    write_old_pair(snap, mem)
    target = snap if which == "snap" else mem
    os.unlink(target)
    os.mkdir(target)
    with pytest.raises(InvalidPath, match="exists and is a directory"):
        save(snap, mem)
    assert os.path.isdir(target)
    other = mem if which == "snap" else snap
    assert Path(other).read_bytes() == (OLD_MEM if which == "snap" else OLD_STATE)
    assert leftovers(os.path.dirname(snap)) == []


def test_a_destination_that_becomes_a_directory_mid_save_keeps_the_old_pair(
    pair: tuple[str, str],
) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    tx = PairTransaction(snap, mem)
    with pytest.raises(InvalidPath, match="snapshot_path exists and is a directory"), tx:
        os.pwrite(tx.mem_fd, NEW_MEM, 0)
        os.unlink(snap)
        os.mkdir(snap)
        tx.commit(NEW_STATE)
    assert Path(mem).read_bytes() == OLD_MEM  # the memory file was not renamed over
    assert leftovers(os.path.dirname(snap)) == []


def test_a_commit_record_that_cannot_be_written_rolls_back(pair: tuple[str, str]) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)

    def close_journal(step: str) -> None:
        if step == "temps_durable":  # the commit record's write then fails for real (EBADF)
            os.close(tx._journal_fd)
            os.dup2(os.open(os.devnull, os.O_RDONLY), tx._journal_fd)

    tx = PairTransaction(snap, mem, step_hook=close_journal)
    with pytest.raises(AtomicCommitFailed, match=r"os error 9\)"), tx:
        os.pwrite(tx.mem_fd, NEW_MEM, 0)
        tx.commit(NEW_STATE)
    assert pair_bytes(snap, mem) == (OLD_STATE, OLD_MEM)
    assert [n for n in os.listdir(os.path.dirname(snap)) if ".squibd-" in n] == []


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "staging"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, check=False)  # fmt: skip
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_staging_dir_on_another_filesystem_fails_before_any_write(tmp_path: Path,
                                                                  tmpfs: Path) -> None:  # fmt: skip
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(AtomicCommitCrossFs) as info:
        PairTransaction(str(dest / "a.snap"), str(dest / "a.mem"), staging_dir=str(tmpfs))
    assert str(info.value) == (
        "snapshot temp-file path is on a different filesystem from the destination "
        f'(dest="{dest}/a.snap", temp_dir="{tmpfs}"); rename(2) cannot be atomic across mounts'
    )
    assert os.listdir(dest) == [] and os.listdir(tmpfs) == []


def test_staging_dir_on_the_same_filesystem_holds_the_temps(tmp_path: Path) -> None:
    stage, dest = tmp_path / "stage", tmp_path / "dest"
    stage.mkdir()
    dest.mkdir()
    snap, mem = str(dest / "a.snap"), str(dest / "a.mem")
    with PairTransaction(snap, mem, staging_dir=str(stage)) as tx:
        assert os.path.dirname(tx.mem_tmp_path) == str(stage)
        os.pwrite(tx.mem_fd, NEW_MEM, 0)
        tx.commit(NEW_STATE)
    assert pair_bytes(snap, mem) == (NEW_STATE, NEW_MEM)
    assert leftovers(str(stage), str(dest)) == []


# --- crash safety: SIGKILL at every step of the commit ------------------------


def save_and_die_at(step: str, snap: str, mem: str) -> None:
    """Fork a child that saves and SIGKILLs itself right after ``step``."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:

            def die(name: str) -> None:
                if name == step:
                    os.kill(os.getpid(), signal.SIGKILL)

            save(snap, mem, step_hook=die)
            code = 4
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    # Exit status 3: the save raised before the step; 4: it finished without reaching it.
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (step, status)


@pytest.mark.parametrize("had_old_pair", [True, False], ids=["old-pair", "no-old-pair"])
@pytest.mark.parametrize("step", COMMIT_STEPS)
def test_sigkill_at_any_step_leaves_old_or_new_pair_after_recovery(
    pair: tuple[str, str], step: str, had_old_pair: bool
) -> None:
    snap, mem = pair
    if had_old_pair:
        write_old_pair(snap, mem)
    save_and_die_at(step, snap, mem)
    recover_pair(snap, mem)
    old = (OLD_STATE, OLD_MEM) if had_old_pair else (None, None)
    expected = (NEW_STATE, NEW_MEM) if COMMIT_STEPS.index(step) >= COMMIT_POINT else old
    assert pair_bytes(snap, mem) == expected
    assert leftovers(os.path.dirname(snap)) == []
    recover_pair(snap, mem)  # idempotent
    assert pair_bytes(snap, mem) == expected


@pytest.mark.parametrize("step", ["temps_created", "committed", "mem_renamed"])
def test_next_save_of_the_paths_recovers_first(pair: tuple[str, str], step: str) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    save_and_die_at(step, snap, mem)
    if step == "mem_renamed":  # the torn instant recovery exists for
        assert pair_bytes(snap, mem) == (OLD_STATE, NEW_MEM)
    with PairTransaction(snap, mem):
        pass  # aborted; recovery ran on entry
    won = COMMIT_STEPS.index(step) >= COMMIT_POINT
    assert pair_bytes(snap, mem) == ((NEW_STATE, NEW_MEM) if won else (OLD_STATE, OLD_MEM))
    assert leftovers(os.path.dirname(snap)) == []


@pytest.mark.parametrize("step", ["state_written", "mem_renamed"])
def test_loading_the_state_file_recovers_first(pair: tuple[str, str], step: str) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    save_and_die_at(step, snap, mem)
    won = COMMIT_STEPS.index(step) >= COMMIT_POINT
    assert read_state_file(snap).memory.pair_id == ("new" if won else "old")
    assert pair_bytes(snap, mem) == ((NEW_STATE, NEW_MEM) if won else (OLD_STATE, OLD_MEM))
    assert leftovers(os.path.dirname(snap)) == []


def test_recover_directory_at_daemon_start(tmp_path: Path) -> None:
    pairs = [(str(tmp_path / f"{i}.snap"), str(tmp_path / f"{i}.mem")) for i in range(2)]
    for (snap, mem), step in zip(pairs, ["state_synced", "state_renamed"], strict=True):
        write_old_pair(snap, mem)
        save_and_die_at(step, snap, mem)
    assert leftovers(str(tmp_path))
    recover_directory(str(tmp_path))
    assert pair_bytes(*pairs[0]) == (OLD_STATE, OLD_MEM)
    assert pair_bytes(*pairs[1]) == (NEW_STATE, NEW_MEM)
    assert leftovers(str(tmp_path)) == []


def test_recovery_in_another_process_leaves_a_live_save_alone(pair: tuple[str, str],
                                                             state: StateDir) -> None:
    snap, mem = pair
    write_old_pair(snap, mem)
    with PairTransaction(snap, mem) as tx:
        os.pwrite(tx.mem_fd, NEW_MEM, 0)
        code = "import sys; from squibd.snapshot.journal import recover_all; " \
            "from squibd.snapshot.statedir import StateDir; recover_all(StateDir.open(sys.argv[1]))"
        result = subprocess.run([sys.executable, "-c", code, state.path],
                                capture_output=True, text=True, check=False)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert os.path.exists(tx.mem_tmp_path) and os.path.exists(tx.state_tmp_path)
        recover_pair(snap, mem)  # in-process: the paths are reserved, nothing happens
        assert os.path.exists(tx.mem_tmp_path)
        tx.commit(NEW_STATE)
    assert pair_bytes(snap, mem) == (NEW_STATE, NEW_MEM)


# --- recovery trusts only what squibd wrote -----------------------------------

#: The conventional unprivileged "nobody" uid, used to play another user.
NOBODY_UID = 65534


def plant_committed_journal(state: StateDir, directory: Path, victim: Path, *, key: bytes,
                            temp_uid: int, txid: str = "00ff") -> tuple[Path, Path]:  # fmt: skip
    """A committed journal, signed with ``key``, whose memory temp would replace ``victim``."""
    snap = directory / "x.snap"
    state_tmp = Path(temp_path_for(str(snap), "state", txid))
    mem_tmp = Path(temp_path_for(str(victim), "mem", txid))
    mem_tmp.write_bytes(b"attacker")
    os.chown(mem_tmp, temp_uid, temp_uid)
    info = os.stat(directory)
    plan = JournalPlan(txid, str(snap), str(victim), str(state_tmp), str(mem_tmp),
                       ((str(directory), info.st_dev, info.st_ino),))  # fmt: skip
    mem_info = os.stat(mem_tmp)
    journal = Path(state.journal_dir) / journal_name(str(snap), txid)
    journal.write_bytes(plan.to_record(key) + commit_record(
        key, txid, [(mem_info.st_dev, mem_info.st_ino), (0, 0)]))
    return journal, mem_tmp


def test_a_journal_planted_beside_the_snapshots_is_never_acted_on(tmp_path: Path,
                                                                  state: StateDir) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    mem_tmp = tmp_path / f".victim{TEMP_MARKER}mem.00ff"
    mem_tmp.write_bytes(b"attacker")
    planted = tmp_path / f".x.snap{JOURNAL_MARKER}00ff"
    planted.write_bytes(b'{"journal": 1}\n')
    recover_all(state)
    recover_directory(str(tmp_path))
    recover_pair(str(tmp_path / "x.snap"), str(victim))
    assert victim.read_bytes() == b"precious"
    assert planted.exists() and mem_tmp.exists()


def test_a_forged_journal_in_the_state_dir_is_quarantined(
    tmp_path: Path, state: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    journal, _ = plant_committed_journal(state, tmp_path, victim, key=b"k" * 32,
                                               temp_uid=os.geteuid())  # fmt: skip
    with caplog.at_level(logging.INFO, logger="squibd.recovery"):
        assert recover_all(state) == {journal.name: RecoveryOutcome.QUARANTINED}
    assert victim.read_bytes() == b"precious"
    assert not journal.exists()
    assert os.listdir(state.quarantine_dir) == [journal.name]
    assert "quarantined" in caplog.text and "no record squibd signed" in caplog.text


def test_recovery_with_our_own_committed_journal_rolls_forward(
    tmp_path: Path, state: StateDir, caplog: pytest.LogCaptureFixture
) -> None:
    target = tmp_path / "x.mem"
    journal, _ = plant_committed_journal(state, tmp_path, target, key=state.key,
                                         temp_uid=os.geteuid())  # fmt: skip
    with caplog.at_level(logging.INFO, logger="squibd.recovery"):
        recover_all(state)
    assert target.read_bytes() == b"attacker"  # the control case: it does roll forward
    assert not journal.exists()
    assert f"journal {journal.name} (snapshot {tmp_path}/x.snap) rolled forward" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_recovery_never_renames_another_users_temp(tmp_path: Path, state: StateDir) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    journal, mem_tmp = plant_committed_journal(state, tmp_path, victim, key=state.key,
                                               temp_uid=NOBODY_UID)  # fmt: skip
    assert recover_all(state) == {journal.name: RecoveryOutcome.QUARANTINED}
    assert victim.read_bytes() == b"precious"
    assert mem_tmp.exists()


def test_recovery_never_renames_a_temp_swapped_after_the_commit(tmp_path: Path,
                                                                state: StateDir) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    journal, mem_tmp = plant_committed_journal(state, tmp_path, victim, key=state.key,
                                               temp_uid=os.geteuid())  # fmt: skip
    swapped = tmp_path / "swapped"
    swapped.write_bytes(b"swapped in")
    with open(mem_tmp, "rb"):  # keeps the old inode alive: its number is not reused
        os.rename(swapped, mem_tmp)  # same name, another inode
        assert recover_all(state) == {journal.name: RecoveryOutcome.QUARANTINED}
    assert victim.read_bytes() == b"precious"


def test_recovery_refuses_a_directory_replaced_by_a_symlink(tmp_path: Path,
                                                            state: StateDir) -> None:
    (tmp_path / "d").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "x.mem"
    victim.write_bytes(b"precious")
    journal, _ = plant_committed_journal(state, tmp_path / "d", tmp_path / "d" / "x.mem",
                                         key=state.key, temp_uid=os.geteuid())  # fmt: skip
    for name in os.listdir(tmp_path / "d"):
        os.rename(tmp_path / "d" / name, outside / name)
    os.rmdir(tmp_path / "d")
    (tmp_path / "d").symlink_to(outside)
    assert recover_all(state) == {journal.name: RecoveryOutcome.QUARANTINED}
    assert victim.read_bytes() == b"precious"


def test_a_journal_that_does_not_match_its_name_is_quarantined(tmp_path: Path,
                                                               state: StateDir) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    journal, _ = plant_committed_journal(state, tmp_path, victim, key=state.key,
                                         temp_uid=os.geteuid())  # fmt: skip
    renamed = journal.with_name(journal.name.replace(".00ff.", ".abcd."))
    journal.rename(renamed)
    assert recover_all(state) == {renamed.name: RecoveryOutcome.QUARANTINED}
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_non_file_in_the_journal_dir_is_quarantined_without_hanging(
    tmp_path: Path, state: StateDir, kind: str
) -> None:
    planted = Path(state.journal_dir) / f"{'0' * 32}.00ff.journal"
    if kind == "fifo":
        os.mkfifo(planted)
    elif kind == "symlink":
        planted.symlink_to("/etc/passwd")
    else:
        planted.mkdir()
    assert recover_all(state) == {planted.name: RecoveryOutcome.QUARANTINED}
    assert os.listdir(state.journal_dir) == []


def test_an_empty_or_torn_journal_is_removed(state: StateDir) -> None:
    empty = Path(state.journal_dir) / f"{'0' * 32}.00ff.journal"
    empty.write_bytes(b"")
    torn = Path(state.journal_dir) / f"{'1' * 32}.00ff.journal"
    torn.write_bytes(b'{"journal": 2, "tx')  # no newline: a write cut short
    outcomes = recover_all(state)
    assert set(outcomes.values()) == {RecoveryOutcome.REMOVED}
    assert os.listdir(state.journal_dir) == [] and os.listdir(state.quarantine_dir) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_a_journal_owned_by_another_user_is_quarantined(tmp_path: Path, state: StateDir) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    journal, _ = plant_committed_journal(state, tmp_path, victim, key=state.key,
                                         temp_uid=os.geteuid())  # fmt: skip
    os.chown(journal, NOBODY_UID, NOBODY_UID)
    assert recover_all(state) == {journal.name: RecoveryOutcome.QUARANTINED}
    assert victim.read_bytes() == b"precious"


def test_reserved_names_are_refused_as_destinations(tmp_path: Path, state: StateDir) -> None:
    for name in (f".a.snap{TEMP_MARKER}mem.00ff", f".a.snap{JOURNAL_MARKER}00ff"):
        with pytest.raises(InvalidPath, match="reserved for squibd"):
            PairTransaction(str(tmp_path / name), str(tmp_path / "a.mem"))
    with pytest.raises(InvalidPath, match="inside squibd's private state directory"):
        PairTransaction(os.path.join(state.journal_dir, "a.snap"), str(tmp_path / "a.mem"))
    assert os.listdir(state.journal_dir) == []


def test_a_save_into_a_subdirectory_is_recovered_at_start(tmp_path: Path,
                                                          state: StateDir) -> None:  # fmt: skip
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    snap, mem = str(sub / "vm.snap"), str(sub / "vm.mem")
    write_old_pair(snap, mem)
    save_and_die_at("mem_renamed", snap, mem)
    assert pair_bytes(snap, mem) == (OLD_STATE, NEW_MEM)  # torn until recovery
    assert list(recover_all(state).values()) == [RecoveryOutcome.ROLLED_FORWARD]
    assert pair_bytes(snap, mem) == (NEW_STATE, NEW_MEM)
    assert leftovers(str(sub)) == []


def test_saves_from_worker_threads_into_one_directory(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(5):
                snap, mem = str(tmp_path / f"{index}.snap"), str(tmp_path / f"{index}.mem")
                with PairTransaction(snap, mem) as tx:
                    os.pwrite(tx.mem_fd, bytes([index, round_]) * 100, 0)
                    recover_directory(str(tmp_path))  # a concurrent recovery must not interfere
                    tx.commit(NEW_STATE)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for i in range(4):
        assert pair_bytes(str(tmp_path / f"{i}.snap"), str(tmp_path / f"{i}.mem")) == (
            NEW_STATE, bytes([i, 4]) * 100)  # fmt: skip
    assert leftovers(str(tmp_path)) == []


def test_a_save_waits_for_a_recovery_of_its_paths_instead_of_failing(
    pair: tuple[str, str],
) -> None:
    snap, mem = pair
    keys = (canonical_path(snap),)
    assert reserve_paths(keys)  # a recovery in progress in this process
    outcome: list[object] = []

    def saver() -> None:
        try:
            save(snap, mem)
            outcome.append("saved")
        except BaseException as exc:  # asserted below
            outcome.append(exc)

    thread = threading.Thread(target=saver)
    thread.start()
    assert not reserve_paths(keys)  # recoveries never wait: they skip busy paths
    release_paths(keys)
    thread.join()
    assert outcome == ["saved"]
    assert pair_bytes(snap, mem) == (NEW_STATE, NEW_MEM)


# --- crash safety at every system call that changes a file ---------------------

#: Every syscall a save may use to change files. File creation (openat) is always
#: followed by fchmod or flock, so the state right after it is covered too.
MUTATING_SYSCALLS = (
    "write,pwrite64,fsync,fdatasync,ftruncate,fchmod,flock,"
    "rename,renameat,renameat2,unlink,unlinkat"
)
#: The child refuses to run unless it imported the very commit.py this test imported
#: (argv[5]): a child that picked up another checkout would test other code.
CHILD_SAVE = """
import os, sys
import squibd.snapshot.commit
from squibd.snapshot.commit import PairTransaction
from squibd.snapshot.statedir import configure_state_dir
snap, mem, state_file, mem_file, expected_module, state_dir = sys.argv[1:7]
if os.path.realpath(squibd.snapshot.commit.__file__) != expected_module:
    sys.exit(f"imported {squibd.snapshot.commit.__file__}, not {expected_module}")
configure_state_dir(state_dir)  # exists already: opening it changes no file
state, memory = open(state_file, "rb").read(), open(mem_file, "rb").read()
with PairTransaction(snap, mem) as tx:
    os.pwrite(tx.mem_fd, memory, 0)
    tx.commit(state, mem_size=len(memory))
"""
#: The checkout this file belongs to; the child runs there so it imports the same code.
REPO = Path(__file__).resolve().parents[2]
#: One trace line of strace -f -o: "<tid> <name>(" (resumed halves of calls do not match).
TRACE_CALL = re.compile(r"^(\d+)\s+(\w+)\(", flags=re.M)


@attrs.frozen
class TracedSave:
    """One save run under strace: how it ended and the traced calls of its main thread."""

    returncode: int
    calls: list[str]
    stderr: str


def run_traced_save(tmp_path: Path, syscalls: str, *inject: str) -> TracedSave:
    """Run CHILD_SAVE under ``strace -f``, tracing ``syscalls`` (plus execve).

    strace counts ``inject=...:when=N`` per thread, and the save runs on the
    child's main thread, so only that thread's calls are returned: the thread
    whose execve started the child.
    """
    trace = tmp_path / "trace.txt"
    command = [
        "strace", "-f", "-qq", "-o", str(trace), "-e", f"trace=execve,{syscalls}", *inject,
        sys.executable, "-c", CHILD_SAVE,
        str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem"),
        str(tmp_path / "new.state"), str(tmp_path / "new.mem"),
        os.path.realpath(commit_module.__file__), str(tmp_path / "state"),
    ]  # fmt: skip
    env = {
        **os.environ,
        "PYTHONDONTWRITEBYTECODE": "1",  # no .pyc writes in the count
        "OPENBLAS_NUM_THREADS": "1",  # numpy (imported by squibd.snapshot) starts no pool
    }
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, check=False)
    lines = TRACE_CALL.findall(trace.read_text()) if trace.exists() else []
    main = next((tid for tid, name in lines if name == "execve"), None)
    assert main is not None, f"strace traced no execve: {result.stderr.decode()}"
    calls = [name for tid, name in lines if tid == main and name != "execve"]
    return TracedSave(result.returncode, calls, result.stderr.decode(errors="replace"))


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (syscall fault injection)")
def test_sigkill_at_every_file_changing_syscall_leaves_old_or_new_pair(tmp_path: Path) -> None:
    """strace SIGKILLs a real save on entry to each of its file-changing syscalls in turn.

    Each injected run is judged by its own trace: killed means killed on entry to
    exactly the nth call; a run may finish only if it made fewer such calls than
    the counting run (there was no nth call), and then it must leave the new pair.
    """
    snap, mem = str(tmp_path / "vm.snap"), str(tmp_path / "vm.mem")
    (tmp_path / "new.state").write_bytes(NEW_STATE)
    (tmp_path / "new.mem").write_bytes(NEW_MEM)
    write_old_pair(snap, mem)
    counted = run_traced_save(tmp_path, MUTATING_SYSCALLS)
    assert counted.returncode == 0, counted.stderr
    calls = counted.calls
    assert {"fsync", "renameat", "unlink"} <= set(calls)
    outcomes: dict[str, list[str]] = {}
    for name in dict.fromkeys(calls):
        for nth in range(1, calls.count(name) + 1):
            write_old_pair(snap, mem)
            run = run_traced_save(tmp_path, name, "-e", f"inject={name}:signal=KILL:when={nth}")
            made = run.calls.count(name)
            where = (name, nth, made, run.returncode, run.stderr)
            if run.returncode == -signal.SIGKILL:
                assert made == nth, where  # the kill came on entry to the nth call
            else:
                assert run.returncode == 0 and made < nth, where  # no nth call to kill on
            recover_pair(snap, mem)
            got = pair_bytes(snap, mem)
            assert got in ((OLD_STATE, OLD_MEM), (NEW_STATE, NEW_MEM)), f"torn at {name} #{nth}"
            assert leftovers(str(tmp_path)) == [], f"temp left at {name} #{nth}"
            if run.returncode == 0:
                assert got == (NEW_STATE, NEW_MEM), f"finished save lost at {name} #{nth}"
            outcomes.setdefault(name, []).append("new" if got[0] == NEW_STATE else "old")
    # Each syscall kind flips from the old pair to the new one at most once, and the
    # renames and the journal unlink come after the commit point.
    for kinds in outcomes.values():
        assert kinds == sorted(kinds, key=lambda outcome: outcome == "new")
    assert set(outcomes["renameat"]) == set(outcomes["unlink"]) == {"new"}
    assert outcomes["fchmod"][0] == "old"


def test_recover_directory_through_a_symlinked_alias(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "alias").symlink_to(real)
    snap, mem = str(real / "vm.snap"), str(real / "vm.mem")
    write_old_pair(snap, mem)
    save_and_die_at("mem_renamed", snap, mem)
    recover_directory(str(tmp_path / "alias") + "/")
    assert pair_bytes(snap, mem) == (NEW_STATE, NEW_MEM)
    assert leftovers(str(real)) == []
