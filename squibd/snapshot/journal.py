"""The pair-commit journal and crash recovery (SPEC section 5, item 6; invariant 4).

A save keeps a journal ``<state_dir>/journal/<key>.<txid>.journal`` for as
long as it runs, locked with ``flock``; ``<key>`` is a hash of the state
file's canonical path, so a load finds the journals of its path without
reading the others. The state directory is private to the daemon's user
(:mod:`squibd.snapshot.statedir`): no client can plant a journal there.

Lines are JSON, a tab and the HMAC-SHA256 of the JSON under the state
directory's key, so a torn or forged line reads as absent. The first line,
the *prepare* record, names the destinations, the two temp files and the
identity (device, inode) of every directory involved; a second line, the
*commit* record, is the commit point of the pair and also names the
identity of both temps.

Recovery of one journal (skipped while a live save holds its lock):

- no authentic prepare record, and the file is empty or holds only a torn
  line: the save died before creating any temp; the journal is removed;
- prepare without commit: roll back, i.e. remove the temps;
- prepare and commit: roll forward, i.e. rename the temps that still exist
  over their destinations (the ones already renamed are gone).

Every rename and unlink is made relative to a directory fd whose identity
matches the prepare record, and a temp is renamed only if it is the very
inode the commit record names. A journal that is not authentic, does not
match its name, or cannot be completed (a directory was replaced, a temp
is not ours, an I/O error) is moved to ``<state_dir>/quarantine`` and
logged; recovery then goes on with the next one. Each journal recovered
gets one log line: rolled forward, rolled back or quarantined.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

import attrs

from .errors import Io
from .paths import JOURNAL_MARKER, TEMP_MARKER
from .statedir import StateDir, StateDirError, current_state_dir

__all__ = [
    "JOURNAL_MARKER",
    "JOURNAL_SUFFIX",
    "RESERVATIONS",
    "RESERVE_TIMEOUT_S",
    "TEMP_MARKER",
    "JournalPlan",
    "PathReservations",
    "RecoveryOutcome",
    "Reservation",
    "canonical_path",
    "commit_record",
    "destination_key",
    "fsync_dir",
    "fsync_dirs",
    "journal_name",
    "journal_path_for",
    "recover_all",
    "recover_directory",
    "recover_pair",
    "recover_reserved",
    "recover_snapshot",
    "release_paths",
    "reserve_paths",
    "temp_path_for",
    "unlink_if_ours",
]

JOURNAL_SUFFIX: Final = ".journal"
#: A save waits at most this long for a recovery of its paths in this process.
RESERVE_TIMEOUT_S: Final = 30.0
_JOURNAL_VERSION: Final = 2
_KEY_HEX: Final = 32
_OPEN_JOURNAL_FLAGS: Final = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

log = logging.getLogger("squibd.recovery")

#: A save waiting for a recovery looks at its cancel event this often.
_CANCEL_CHECK_S: Final = 0.05


@attrs.frozen
class Reservation:
    """Who holds a destination path in this process: a save or a (brief) recovery."""

    for_save: bool
    #: The name of the thread that took it (a worker thread of the daemon).
    thread: str
    #: ``time.monotonic()`` when it was taken.
    since: float


class PathReservations:
    """The destinations with a save or a recovery in progress in this process.

    One registry per process (:data:`RESERVATIONS`): the commit journal is
    per state directory, but two threads of one process must not interleave
    renames of one path, which ``flock`` (per open file) does not prevent.
    Every wait on it is bounded (``timeout_s``) and ends early when the
    waiter's cancel event is set; :meth:`held` shows who holds what.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held: dict[str, Reservation] = {}

    def reserve(
        self,
        paths: Iterable[str],
        *,
        for_save: bool = False,
        timeout_s: float = RESERVE_TIMEOUT_S,
        cancel: threading.Event | None = None,
    ) -> bool:
        """See :func:`reserve_paths`."""
        keys = set(paths)
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                holders = [self._held[key].for_save for key in keys if key in self._held]
                if not holders:
                    taken = Reservation(for_save, threading.current_thread().name, time.monotonic())
                    self._held.update(dict.fromkeys(keys, taken))
                    return True
                remaining = deadline - time.monotonic()
                if not for_save or any(holders) or remaining <= 0:
                    return False
                if cancel is not None:
                    if cancel.is_set():
                        return False
                    # A cancel event cannot wake a condition: look at it now and then.
                    remaining = min(remaining, _CANCEL_CHECK_S)
                self._changed.wait(remaining)

    def release(self, paths: Iterable[str]) -> None:
        """See :func:`release_paths`."""
        with self._changed:
            for key in paths:
                self._held.pop(key, None)
            self._changed.notify_all()

    def held(self) -> dict[str, Reservation]:
        """A copy of the current reservations, canonical path -> holder."""
        with self._changed:
            return dict(self._held)


#: This process's registry of destinations in use.
RESERVATIONS: Final = PathReservations()


def canonical_path(path: str) -> str:
    """A destination's identity: resolved parent directory plus base name."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def reserve_paths(
    paths: Iterable[str],
    *,
    for_save: bool = False,
    timeout_s: float = RESERVE_TIMEOUT_S,
    cancel: threading.Event | None = None,
) -> bool:
    """Claim canonical destination paths for this process (in :data:`RESERVATIONS`).

    A recovery (``for_save=False``) gets False at once if any path is taken.
    A save waits while only recoveries hold its paths (they are brief), at
    most ``timeout_s``, and gets False if another save holds one, the wait
    runs out, or ``cancel`` is set meanwhile.
    """
    return RESERVATIONS.reserve(paths, for_save=for_save, timeout_s=timeout_s, cancel=cancel)


def release_paths(paths: Iterable[str]) -> None:
    """Give back paths claimed with :func:`reserve_paths`."""
    RESERVATIONS.release(paths)


@contextlib.contextmanager
def _reserved(keys: Sequence[str]) -> Iterator[bool]:
    got = reserve_paths(keys)
    try:
        yield got
    finally:
        if got:
            release_paths(keys)


def fsync_dir(directory: str | int) -> None:
    """Make a directory's entries (creations, renames, unlinks) durable (path or fd)."""
    if isinstance(directory, int):
        os.fsync(directory)
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dirs(paths: Iterable[str]) -> None:
    """fsync the parent directory of each path, once per directory."""
    for directory in dict.fromkeys(os.path.dirname(p) for p in paths):
        fsync_dir(directory)


def destination_key(snapshot_path: str) -> str:
    """The journal-name prefix of a state file (hash of its canonical path)."""
    raw = canonical_path(snapshot_path).encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()[:_KEY_HEX]


def journal_name(snapshot_path: str, txid: str) -> str:
    """The journal's file name (in the state directory's journal folder)."""
    return f"{destination_key(snapshot_path)}.{txid}{JOURNAL_SUFFIX}"


def journal_path_for(snapshot_path: str, txid: str, state: StateDir | None = None) -> str:
    """Where the journal of a save of ``snapshot_path`` lives."""
    state = state or current_state_dir()
    return os.path.join(state.journal_dir, journal_name(snapshot_path, txid))


def temp_path_for(dest: str, role: str, txid: str, staging_dir: str | None = None) -> str:
    """The temp file of ``dest`` (role ``state`` or ``mem``), beside it or in staging."""
    directory = staging_dir or os.path.dirname(dest)
    return os.path.join(directory, f".{os.path.basename(dest)}{TEMP_MARKER}{role}.{txid}")


def _mac(key: bytes, text: bytes) -> str:
    return hmac.new(key, text, hashlib.sha256).hexdigest()


def _record(key: bytes, payload: dict[str, object]) -> bytes:
    text = json.dumps(payload, sort_keys=True).encode()
    return text + b"\t" + _mac(key, text).encode() + b"\n"


def commit_record(key: bytes, txid: str, temp_ids: Sequence[tuple[int, int]]) -> bytes:
    """The line that commits ``txid``; ``temp_ids``: (dev, ino) of the mem and state temps."""
    return _record(key, {"commit": txid, "temps": [list(ids) for ids in temp_ids]})


def _parse_records(key: bytes, data: bytes) -> tuple[list[dict[str, object]], bool]:
    """Authentic records, and whether any complete line failed authentication."""
    records: list[dict[str, object]] = []
    forged = False
    for line in data.split(b"\n")[:-1]:  # the part after the last newline is torn
        text, _, mac = line.rpartition(b"\t")
        if not text or not hmac.compare_digest(mac, _mac(key, text).encode()):
            forged = True
            continue
        value = json.loads(text)
        if isinstance(value, dict):
            records.append(value)
    return records, forged


def _ours(st: os.stat_result) -> bool:
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def unlink_if_ours(path: str, dir_fd: int | None = None) -> None:
    """Remove a temp we created; never a symlink or another user's file planted there."""
    try:
        if _ours(os.stat(path, dir_fd=dir_fd, follow_symlinks=False)):
            os.unlink(path, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def _id_list(value: object) -> tuple[tuple[int, int], ...] | None:
    if not isinstance(value, list):
        return None
    ids: list[tuple[int, int]] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) for n in item)):  # fmt: skip
            return None
        ids.append((item[0], item[1]))
    return tuple(ids)


@attrs.frozen
class JournalPlan:
    """The prepare record: which temps become which destinations (canonical paths)."""

    txid: str
    snapshot_path: str
    mem_file_path: str
    state_tmp: str
    mem_tmp: str
    #: (real path, st_dev, st_ino) of every directory the save touches.
    dirs: tuple[tuple[str, int, int], ...] = ()

    def to_record(self, key: bytes) -> bytes:
        """The prepare line of the journal."""
        payload: dict[str, object] = {"journal": _JOURNAL_VERSION, **attrs.asdict(self)}
        payload["dirs"] = [list(entry) for entry in self.dirs]
        return _record(key, payload)

    @classmethod
    def from_record(cls, record: dict[str, object]) -> JournalPlan | None:
        """Parse a prepare record; None when it is not one."""
        names = ("txid", "snapshot_path", "mem_file_path", "state_tmp", "mem_tmp")
        if record.get("journal") != _JOURNAL_VERSION:
            return None
        if not all(isinstance(record.get(name), str) for name in names):
            return None
        raw_dirs = record.get("dirs")
        if not isinstance(raw_dirs, list):
            return None
        dirs: list[tuple[str, int, int]] = []
        for entry in raw_dirs:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                    and isinstance(entry[1], int) and isinstance(entry[2], int)):  # fmt: skip
                return None
            dirs.append((entry[0], entry[1], entry[2]))
        txid, snap, mem, state_tmp, mem_tmp = (str(record[name]) for name in names)
        return cls(txid, snap, mem, state_tmp, mem_tmp, tuple(dirs))

    def moves(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """(temp, destination) of the memory file, then of the state file."""
        return (self.mem_tmp, self.mem_file_path), (self.state_tmp, self.snapshot_path)

    def matches(self, name: str) -> bool:
        """True when the record is the one a save with this journal name writes."""
        state_dir, mem_dir = os.path.dirname(self.state_tmp), os.path.dirname(self.mem_tmp)
        known = {entry[0] for entry in self.dirs}
        paths = (self.snapshot_path, self.mem_file_path, self.state_tmp, self.mem_tmp)
        return (
            name == journal_name(self.snapshot_path, self.txid)
            and all(os.path.isabs(p) and ".." not in p.split("/") for p in paths)
            and {os.path.dirname(p) for p in paths} <= known
            and self.state_tmp == temp_path_for(self.snapshot_path, "state", self.txid, state_dir)
            and self.mem_tmp == temp_path_for(self.mem_file_path, "mem", self.txid, mem_dir)
            and state_dir in (os.path.dirname(self.snapshot_path), mem_dir)
            and mem_dir in (os.path.dirname(self.mem_file_path), state_dir)
        )


class _Quarantine(Exception):
    """This journal cannot be completed safely; its message says why."""


class RecoveryOutcome:
    """What recovery did with one journal (the values are the log words)."""

    ROLLED_FORWARD: Final = "rolled forward"
    ROLLED_BACK: Final = "rolled back"
    REMOVED: Final = "removed (the save died before its prepare record)"
    QUARANTINED: Final = "quarantined"
    BUSY: Final = "busy"
    GONE: Final = "gone"


class _Dirs:
    """The plan's directories, opened once and checked against the recorded identities."""

    def __init__(self, plan: JournalPlan) -> None:
        self.fds: dict[str, int | None] = {}
        try:
            for path, dev, ino in plan.dirs:
                try:
                    fd = os.open(path, _DIR_FLAGS)
                except FileNotFoundError:
                    self.fds[path] = None  # removed since: it holds no temp any more
                    continue
                self.fds[path] = fd
                info = os.fstat(fd)
                if (info.st_dev, info.st_ino) != (dev, ino):
                    raise _Quarantine(f"directory {path} was replaced since the save")
        except BaseException:
            self.close()
            raise

    def at(self, path: str) -> tuple[int | None, str]:
        return self.fds[os.path.dirname(path)], os.path.basename(path)

    def sync(self) -> None:
        for fd in self.fds.values():
            if fd is not None:
                os.fsync(fd)

    def close(self) -> None:
        for fd in self.fds.values():
            if fd is not None:
                os.close(fd)
        self.fds.clear()


def _roll_forward(plan: JournalPlan, dirs: _Dirs, temp_ids: Sequence[tuple[int, int]]) -> None:
    if len(temp_ids) != 2:
        raise _Quarantine("its commit record does not name both temps")
    for (tmp, dest), temp_id in zip(plan.moves(), temp_ids, strict=True):
        tmp_fd, tmp_name = dirs.at(tmp)
        if tmp_fd is None:
            continue  # its directory is gone, and the temp with it
        try:
            info = os.stat(tmp_name, dir_fd=tmp_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # renamed before the crash
        if not _ours(info) or (info.st_dev, info.st_ino) != temp_id:
            raise _Quarantine(f"{tmp} is not the temp file squibd wrote")
        dest_fd, dest_name = dirs.at(dest)
        if dest_fd is None:
            raise _Quarantine(f"the directory of {dest} is gone")
        os.rename(tmp_name, dest_name, src_dir_fd=tmp_fd, dst_dir_fd=dest_fd)
    dirs.sync()


def _roll_back(plan: JournalPlan, dirs: _Dirs) -> None:
    for tmp, _ in plan.moves():
        tmp_fd, tmp_name = dirs.at(tmp)
        if tmp_fd is not None:
            unlink_if_ours(tmp_name, tmp_fd)
    dirs.sync()


def _apply(state: StateDir, name: str, data: bytes) -> str:
    """Roll the journal ``name`` (its bytes ``data``) forward or back; returns the outcome."""
    records, forged = _parse_records(state.key, data)
    if not records:
        if forged:
            raise _Quarantine("it holds no record squibd signed")
        return RecoveryOutcome.REMOVED
    plan = JournalPlan.from_record(records[0])
    if plan is None or not plan.matches(name):
        raise _Quarantine("its prepare record does not match its name")
    commits = [r for r in records[1:] if r.get("commit") == plan.txid]
    dirs = _Dirs(plan)
    try:
        if commits:
            temp_ids = _id_list(commits[0].get("temps"))
            _roll_forward(plan, dirs, temp_ids or ())
            return RecoveryOutcome.ROLLED_FORWARD
        _roll_back(plan, dirs)
        return RecoveryOutcome.ROLLED_BACK
    finally:
        dirs.close()


def _snapshot_of(data: bytes, key: bytes) -> str:
    records, _ = _parse_records(key, data)
    plan = JournalPlan.from_record(records[0]) if records else None
    return plan.snapshot_path if plan is not None else "?"


def _quarantine(state: StateDir, name: str, reason: str, data: bytes) -> None:
    target = os.path.join(state.quarantine_dir, name)
    try:
        os.rename(os.path.join(state.journal_dir, name), target)
        fsync_dir(state.journal_dir)
        fsync_dir(state.quarantine_dir)
    except OSError as exc:
        log.error("recovery: journal %s (snapshot %s) cannot be completed (%s) nor moved "
                  "aside: %s", name, _snapshot_of(data, state.key), reason, exc)  # fmt: skip
        return
    log.warning("recovery: journal %s (snapshot %s) quarantined to %s: %s",
                name, _snapshot_of(data, state.key), target, reason)  # fmt: skip


def recover_journal(state: StateDir, name: str) -> str:
    """Recover one journal of ``state`` (see the module doc); returns a RecoveryOutcome."""
    path = os.path.join(state.journal_dir, name)
    try:
        fd = os.open(path, _OPEN_JOURNAL_FLAGS)
    except FileNotFoundError:
        return RecoveryOutcome.GONE
    except OSError as exc:  # a symlink (ELOOP) or worse: nothing squibd wrote
        _quarantine(state, name, f"cannot be opened: {exc.strerror}", b"")
        return RecoveryOutcome.QUARANTINED
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return RecoveryOutcome.BUSY  # a live save (maybe in another process) owns it
        info = os.fstat(fd)
        if info.st_nlink == 0:
            return RecoveryOutcome.GONE  # another recovery finished it while we opened it
        data = b""
        try:
            if not _ours(info):
                raise _Quarantine("it is not a regular file of squibd's uid")
            data = os.pread(fd, info.st_size, 0)
            outcome = _apply(state, name, data)
        except (_Quarantine, OSError, ValueError) as exc:
            reason = str(exc) if isinstance(exc, _Quarantine) else f"{type(exc).__name__}: {exc}"
            _quarantine(state, name, reason, data)
            return RecoveryOutcome.QUARANTINED
        os.unlink(path)
        fsync_dir(state.journal_dir)
        log.info("recovery: journal %s (snapshot %s) %s", name, _snapshot_of(data, state.key),
                 outcome)  # fmt: skip
        return outcome
    finally:
        os.close(fd)


def _journal_names(state: StateDir, prefix: str = "") -> list[str]:
    try:
        names = os.listdir(state.journal_dir)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix) and n.endswith(JOURNAL_SUFFIX))


def recover_reserved(snapshot_path: str, state: StateDir | None = None) -> None:
    """Recovery of one state file's journals, for a caller that reserved its path.

    Raises:
        Io: the journal folder cannot be read or a journal cannot be removed.
    """
    try:
        state = state or current_state_dir()
        for name in _journal_names(state, destination_key(snapshot_path) + "."):
            recover_journal(state, name)
    except OSError as exc:
        raise Io(exc) from exc


def recover_pair(snapshot_path: str, mem_file_path: str, state: StateDir | None = None) -> None:
    """Finish or undo any interrupted save of this pair (idempotent).

    Run before loading or saving these paths. Journals a live save holds are
    left alone, as are saves of these paths running in this process.

    Raises:
        Io: the journal folder cannot be read or a journal cannot be removed.
    """
    with _reserved((canonical_path(snapshot_path), canonical_path(mem_file_path))) as got:
        if got:
            recover_reserved(snapshot_path, state)


def recover_snapshot(snapshot_path: str, state: StateDir | None = None) -> None:
    """Finish or undo an interrupted save of this state file before it is read.

    Like :func:`recover_pair` knowing only the state file; ``read_state_file``
    calls it so that every load recovers. A process whose state directory
    cannot be opened (an offline tool run by a user without one) has no
    journals to recover and skips this.

    Raises:
        Io: the journal folder cannot be read or a journal cannot be removed.
    """
    if state is None:
        try:
            state = current_state_dir()
        except StateDirError as exc:
            log.debug("no recovery before reading %s: %s", snapshot_path, exc)
            return
    with _reserved((canonical_path(snapshot_path),)) as got:
        if got:
            recover_reserved(snapshot_path, state)


def recover_all(state: StateDir | None = None) -> dict[str, str]:
    """Recover every journal of the state directory (the daemon runs it at start).

    Returns:
        journal name -> outcome (see :class:`RecoveryOutcome`).

    Raises:
        Io: the journal folder cannot be read or a journal cannot be removed.
    """
    try:
        state = state or current_state_dir()
        return {name: recover_journal(state, name) for name in _journal_names(state)}
    except OSError as exc:
        raise Io(exc) from exc


def recover_directory(directory: str, state: StateDir | None = None) -> None:
    """Recover every interrupted save whose state file lies in or below ``directory``.

    Raises:
        Io: the journal folder cannot be read or a journal cannot be removed.
    """
    root = os.path.realpath(directory)
    try:
        state = state or current_state_dir()
        for name in _journal_names(state):
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(os.path.join(state.journal_dir, name), flags)
            except OSError:
                continue
            try:
                snapshot = _snapshot_of(os.pread(fd, 1 << 16, 0), state.key)
            finally:
                os.close(fd)
            if snapshot != "?" and os.path.commonpath((snapshot, root)) == root:
                recover_journal(state, name)
    except OSError as exc:
        raise Io(exc) from exc
