"""The pair-commit journal and crash recovery (SPEC section 5, item 6; invariant 4).

A save of ``<dir>/<snap>`` keeps a journal ``<dir>/.<snap>.squibd-journal.<txid>``
for as long as it runs, locked with ``flock``. Its first line, the *prepare*
record, names the destinations and the two temp files; a second line, the
*commit* record, is the commit point of the pair. Lines are JSON followed by
a tab and the CRC-32 of the JSON, so a torn line reads as absent.

Recovery of one journal (skipped while a live save holds its lock):

- no valid prepare record: the save died before creating any temp; the
  journal is removed;
- prepare without commit: roll back, i.e. remove the temps;
- prepare and commit: roll forward, i.e. rename the temps that still exist
  over their destinations (the ones already renamed are gone).

The daemon runs as root and journals live in directories users can write
to, so recovery trusts nothing it did not create: journal and temps must be
regular files owned by our effective uid, and the prepare record must match
the journal's own name (snapshot name, txid) and the temp-name pattern.
Anything else is left alone.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import threading
import zlib
from collections.abc import Iterable
from typing import Final

import attrs

from .errors import Io

__all__ = [
    "JOURNAL_MARKER",
    "TEMP_MARKER",
    "JournalPlan",
    "canonical_path",
    "commit_record",
    "fsync_dir",
    "fsync_dirs",
    "journal_path_for",
    "recover_directory",
    "recover_pair",
    "recover_reserved",
    "recover_snapshot",
    "release_paths",
    "reserve_paths",
    "temp_path_for",
    "unlink_if_ours",
]

JOURNAL_MARKER: Final = ".squibd-journal."
TEMP_MARKER: Final = ".squibd-tmp-"
_JOURNAL_VERSION: Final = 1
_OPEN_JOURNAL_FLAGS: Final = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

# Destinations with a save (or a recovery) in progress in this process:
# canonical path -> True for a save, False for a (brief) recovery.
_active_changed = threading.Condition()
_active_paths: dict[str, bool] = {}


def canonical_path(path: str) -> str:
    """A destination's identity: resolved parent directory plus base name."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def reserve_paths(paths: Iterable[str], *, for_save: bool = False) -> bool:
    """Claim canonical destination paths for this process.

    A recovery (``for_save=False``) gets False at once if any path is taken.
    A save waits while only recoveries hold its paths (they are brief) and
    gets False if another save holds one.
    """
    keys = set(paths)
    with _active_changed:
        while True:
            holders = [_active_paths[key] for key in keys if key in _active_paths]
            if not holders:
                _active_paths.update(dict.fromkeys(keys, for_save))
                return True
            if not for_save or any(holders):
                return False
            _active_changed.wait()


def release_paths(paths: Iterable[str]) -> None:
    """Give back paths claimed with :func:`reserve_paths`."""
    with _active_changed:
        for key in paths:
            _active_paths.pop(key, None)
        _active_changed.notify_all()


def fsync_dir(directory: str) -> None:
    """Make a directory's entries (creations, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[str]) -> None:
    """fsync the parent directory of each path, once per directory."""
    for directory in dict.fromkeys(os.path.dirname(p) for p in paths):
        fsync_dir(directory)


def journal_path_for(snapshot_path: str, txid: str) -> str:
    """Where the journal of a save of ``snapshot_path`` lives."""
    directory, name = os.path.split(snapshot_path)
    return os.path.join(directory, f".{name}{JOURNAL_MARKER}{txid}")


def temp_path_for(dest: str, role: str, txid: str, staging_dir: str | None = None) -> str:
    """The temp file of ``dest`` (role ``state`` or ``mem``), beside it or in staging."""
    directory = staging_dir or os.path.dirname(dest)
    return os.path.join(directory, f".{os.path.basename(dest)}{TEMP_MARKER}{role}.{txid}")


def _record(payload: dict[str, object]) -> bytes:
    text = json.dumps(payload, sort_keys=True)
    return f"{text}\t{zlib.crc32(text.encode()):08x}\n".encode()


def commit_record(txid: str) -> bytes:
    """The line that commits transaction ``txid``."""
    return _record({"commit": txid})


def _parse_records(data: bytes) -> list[dict[str, object]]:
    """Records whose checksum holds; a torn last line is simply absent."""
    records: list[dict[str, object]] = []
    for line in data.split(b"\n")[:-1]:
        text, _, crc = line.decode("utf-8", "replace").rpartition("\t")
        if text and crc == f"{zlib.crc32(text.encode()):08x}":
            value = json.loads(text)
            if isinstance(value, dict):
                records.append(value)
    return records


def _ours(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def unlink_if_ours(path: str) -> None:
    """Remove a temp we created; never a symlink or another user's file planted there."""
    try:
        if _ours(os.lstat(path)):
            os.unlink(path)
    except FileNotFoundError:
        pass


@attrs.frozen
class JournalPlan:
    """The prepare record: which temps become which destinations."""

    txid: str
    snapshot_path: str
    mem_file_path: str
    state_tmp: str
    mem_tmp: str

    def to_record(self) -> bytes:
        """The prepare line of the journal."""
        return _record({"journal": _JOURNAL_VERSION, **attrs.asdict(self)})

    @classmethod
    def from_record(cls, record: dict[str, object]) -> JournalPlan | None:
        """Parse a prepare record; None when it is not one."""
        names = [a.name for a in attrs.fields(cls)]
        if record.get("journal") != _JOURNAL_VERSION:
            return None
        if not all(isinstance(record.get(name), str) for name in names):
            return None
        return cls(**{name: str(record[name]) for name in names})

    def matches(self, journal_path: str) -> bool:
        """True when the record is the one a save of this journal's name writes."""
        state_dir, mem_dir = os.path.dirname(self.state_tmp), os.path.dirname(self.mem_tmp)
        return (
            canonical_path(journal_path_for(self.snapshot_path, self.txid))
            == canonical_path(journal_path)
            and self.state_tmp == temp_path_for(self.snapshot_path, "state", self.txid, state_dir)
            and self.mem_tmp == temp_path_for(self.mem_file_path, "mem", self.txid, mem_dir)
            and state_dir in (os.path.dirname(self.snapshot_path), mem_dir)
            and mem_dir in (os.path.dirname(self.mem_file_path), state_dir)
        )


def _roll_forward(plan: JournalPlan) -> None:
    for tmp, dest in ((plan.mem_tmp, plan.mem_file_path), (plan.state_tmp, plan.snapshot_path)):
        try:
            if _ours(os.lstat(tmp)):
                os.rename(tmp, dest)
        except FileNotFoundError:
            pass  # renamed before the crash
    fsync_dirs((plan.mem_tmp, plan.state_tmp, plan.mem_file_path, plan.snapshot_path))


def _roll_back(plan: JournalPlan) -> None:
    unlink_if_ours(plan.mem_tmp)
    unlink_if_ours(plan.state_tmp)
    fsync_dirs((plan.mem_tmp, plan.state_tmp))


def _recover_journal(journal_path: str) -> None:
    """Roll one journal forward or back unless a live save holds it."""
    try:
        fd = os.open(journal_path, _OPEN_JOURNAL_FLAGS)
    except OSError:
        return  # gone, a symlink (ELOOP), or unreadable: not a journal we wrote
    try:
        if not _ours(os.fstat(fd)):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live save (maybe in another process) owns it
        info = os.fstat(fd)
        if info.st_nlink == 0:
            return  # another recovery finished it while we opened it
        records = _parse_records(os.pread(fd, info.st_size, 0))
        plan = JournalPlan.from_record(records[0]) if records else None
        if plan is not None:
            if not plan.matches(journal_path):
                return  # not what squibd writes: leave it for a human
            if {"commit": plan.txid} in records[1:]:
                _roll_forward(plan)
            else:
                _roll_back(plan)
        os.unlink(journal_path)
        fsync_dir(os.path.dirname(journal_path))
    finally:
        os.close(fd)


def _journals(directory: str, snapshot_name: str | None) -> list[str]:
    prefix = f".{snapshot_name}{JOURNAL_MARKER}" if snapshot_name is not None else "."
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []  # no directory we can list holds no journal we wrote
    return sorted(
        os.path.join(directory, name)
        for name in names
        if name.startswith(prefix) and JOURNAL_MARKER in name
    )


def recover_reserved(snapshot_path: str) -> None:
    """Recovery for a caller that already reserved the snapshot path.

    Raises:
        Io: a rename, unlink or fsync failed.
    """
    directory, name = os.path.split(snapshot_path)
    try:
        for journal in _journals(directory, name):
            _recover_journal(journal)
    except OSError as exc:
        raise Io(exc) from exc


def recover_pair(snapshot_path: str, mem_file_path: str) -> None:
    """Finish or undo any interrupted save of this pair (idempotent).

    Run before loading or saving these paths. Journals a live save holds are
    left alone, as are saves of these paths running in this process.

    Raises:
        Io: a rename, unlink or fsync of the recovery failed.
    """
    keys = (canonical_path(snapshot_path), canonical_path(mem_file_path))
    if not reserve_paths(keys):
        return  # a save of these paths is running in this process
    try:
        recover_reserved(snapshot_path)
    finally:
        release_paths(keys)


def recover_snapshot(snapshot_path: str) -> None:
    """Finish or undo an interrupted save of this state file before it is read.

    Like :func:`recover_pair` but knowing only the state file (journals live
    beside it); ``read_state_file`` calls it so that every load recovers.

    Raises:
        Io: a rename, unlink or fsync of the recovery failed.
    """
    key = canonical_path(snapshot_path)
    if not reserve_paths((key,)):
        return  # a save of this path is running in this process
    try:
        recover_reserved(snapshot_path)
    finally:
        release_paths((key,))


def recover_directory(directory: str) -> None:
    """Recover every interrupted save whose journal lies in ``directory``.

    Run at daemon start for every directory snapshots were saved to.

    Raises:
        Io: a rename, unlink or fsync of the recovery failed.
    """
    for journal in _journals(directory, None):
        snapshot_name = os.path.basename(journal)[1:].rsplit(JOURNAL_MARKER, 1)[0]
        key = canonical_path(os.path.join(directory, snapshot_name))
        if not reserve_paths((key,)):
            continue
        try:
            _recover_journal(journal)
        except OSError as exc:
            raise Io(exc) from exc
        finally:
            release_paths((key,))
