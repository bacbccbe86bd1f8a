"""The private state directory, its key, signed journal records, bounded waits (issue 10)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from squibd.snapshot.envelope import encode_state
from squibd.snapshot.errors import Io
from squibd.snapshot.journal import (
    JournalPlan,
    _parse_records,
    commit_record,
    release_paths,
    reserve_paths,
)
from squibd.snapshot.statedir import (
    KEY_BYTES,
    ROOT_STATE_DIR,
    StateDir,
    StateDirError,
    default_state_dir,
)

NOBODY_UID = 65534


def test_default_state_dir_follows_the_user() -> None:
    assert default_state_dir({}, euid=0) == ROOT_STATE_DIR == "/var/lib/squibd/state"
    assert default_state_dir({"XDG_STATE_HOME": "/x/state"}, euid=1000) == "/x/state/squibd"
    assert default_state_dir({"HOME": "/home/u"}, euid=1000) == "/home/u/.local/state/squibd"
    relative = {"XDG_STATE_HOME": "rel", "HOME": "/home/u"}  # ignored, as the XDG spec says
    assert default_state_dir(relative, euid=1000) == "/home/u/.local/state/squibd"


def test_state_dir_is_created_private_with_a_private_key(tmp_path: Path) -> None:
    state = StateDir.open(str(tmp_path / "a" / "state"))
    for directory in (state.path, state.journal_dir, state.quarantine_dir):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    key_path = os.path.join(state.path, "journal.key")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert len(state.key) == KEY_BYTES
    assert StateDir.open(state.path).key == state.key  # stable across opens
    assert sorted(os.listdir(state.path)) == ["journal", "journal.key", "quarantine"]


def test_a_too_open_state_dir_is_narrowed(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir(mode=0o777)
    os.chmod(path, 0o777)
    StateDir.open(str(path))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own files as another user")
def test_a_state_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    os.chown(path, NOBODY_UID, NOBODY_UID)
    with pytest.raises(StateDirError, match=f"belongs to uid {NOBODY_UID}"):
        StateDir.open(str(path))


def test_a_symlink_as_state_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "real")
    with pytest.raises(StateDirError, match="symbolic link"):
        StateDir.open(str(tmp_path / "state"))


def test_a_bad_key_is_refused(tmp_path: Path) -> None:
    state = StateDir.open(str(tmp_path / "state"))
    Path(state.path, "journal.key").write_bytes(b"short")
    with pytest.raises(StateDirError, match="is 5 bytes"):
        StateDir.open(state.path)


def test_processes_racing_to_create_the_key_agree(tmp_path: Path) -> None:
    path = str(tmp_path / "state")
    code = "import sys; from squibd.snapshot.statedir import StateDir; " \
        "sys.stdout.write(StateDir.open(sys.argv[1]).key.hex())"
    procs = [subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE)
             for _ in range(4)]  # fmt: skip
    keys = {proc.communicate()[0] for proc in procs}
    assert len(keys) == 1
    assert bytes.fromhex(keys.pop().decode()) == StateDir.open(path).key


def test_records_are_authenticated(tmp_path: Path) -> None:
    key = os.urandom(KEY_BYTES)
    plan = JournalPlan("00ff", "/r/x.snap", "/r/x.mem", "/r/.x.snap.squibd-tmp-state.00ff",
                       "/r/.x.mem.squibd-tmp-mem.00ff", (("/r", 1, 2),))  # fmt: skip
    data = plan.to_record(key) + commit_record(key, "00ff", [(1, 3), (1, 4)])
    records, forged = _parse_records(key, data)
    assert not forged and JournalPlan.from_record(records[0]) == plan
    assert records[1]["commit"] == "00ff"
    assert _parse_records(os.urandom(KEY_BYTES), data) == ([], True)  # another key
    tampered = data.replace(b"/r/x.mem", b"/e/x.mem", 1)
    records, forged = _parse_records(key, tampered)
    assert forged and [r.get("commit") for r in records] == ["00ff"]  # prepare is gone
    torn, forged = _parse_records(key, data[:-5])  # the commit line cut short: absent
    assert not forged and len(torn) == 1 and JournalPlan.from_record(torn[0]) == plan


def test_a_save_waits_for_a_recovery_only_for_a_bounded_time() -> None:
    keys = ("/nowhere/bounded-wait.snap",)
    assert reserve_paths(keys)  # a recovery that never finishes
    try:
        got: list[bool] = []
        thread = threading.Thread(
            target=lambda: got.append(reserve_paths(keys, for_save=True, timeout_s=0.05))
        )
        thread.start()
        thread.join()  # returns: the wait is bounded (no timing is asserted)
        assert got == [False]
    finally:
        release_paths(keys)
    assert reserve_paths(keys, for_save=True, timeout_s=0.05)
    release_paths(keys)


def test_a_cancelled_save_stops_waiting_for_a_recovery_and_holders_are_visible(
    tmp_path: Path,
) -> None:
    from squibd.snapshot.commit import PairCancelled, PairTransaction
    from squibd.snapshot.journal import RESERVATIONS, canonical_path

    snap, mem = str(tmp_path / "c.snap"), str(tmp_path / "c.mem")
    keys = (canonical_path(snap), canonical_path(mem))
    assert reserve_paths(keys)  # a recovery that never finishes
    try:
        held = RESERVATIONS.held()
        assert {key: held[key].for_save for key in keys} == dict.fromkeys(keys, False)
        assert held[keys[0]].thread == threading.current_thread().name
        cancel = threading.Event()
        cancel.set()
        # An hour-long timeout: only the cancel event can end this wait.
        assert not reserve_paths(keys, for_save=True, timeout_s=3600, cancel=cancel)
        with pytest.raises(PairCancelled):
            PairTransaction(snap, mem, cancel=cancel)
        assert not os.listdir(tmp_path)  # nothing was written
    finally:
        release_paths(keys)
    assert not set(keys) & set(RESERVATIONS.held())


def test_state_dir_in_the_config_and_on_the_command_line(tmp_path: Path) -> None:
    from squibd.cli.serve import _apply_overrides, build_parser
    from squibd.config import DaemonConfig, parse_config

    assert DaemonConfig().server.state_dir == default_state_dir()
    config = parse_config({"server": {"state_dir": str(tmp_path / "s")}})
    assert config.server.state_dir == str(tmp_path / "s")
    args = build_parser().parse_args(["--state-dir", "relative/state"])
    overridden = _apply_overrides(config, args)
    assert overridden.server.state_dir == os.path.abspath("relative/state")
    with pytest.raises(Exception, match="state_dir must be a non-empty path"):
        parse_config({"server": {"state_dir": ""}})


def test_a_reader_without_a_usable_state_dir_still_reads_state_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offline reader whose state dir cannot exist has no journals: reads go on."""
    from squibd.snapshot import statedir
    from squibd.snapshot.envelope import read_state_file
    from squibd.snapshot.journal import recover_all
    from tests.snapshot._states import sample_manifest, sample_x86_state

    snap = tmp_path / "a.snap"
    snap.write_bytes(encode_state(sample_x86_state(1, 1, manifest=sample_manifest(1))))
    monkeypatch.setattr(statedir, "_configured", "/proc/no-state-dir-here")  # mkdir fails there
    monkeypatch.setattr(statedir, "_opened", None)
    assert read_state_file(snap).memory.pair_id == sample_manifest(1).pair_id
    with pytest.raises(Io, match="os error"):
        recover_all()  # the daemon, though, refuses to run without it
