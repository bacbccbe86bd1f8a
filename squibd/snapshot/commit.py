"""The pair commit (SPEC section 5, items 4-7) and its crash recovery.

Theory of operation. Two files cannot be renamed atomically together, so a
save is a small write-ahead transaction whose commit point is one record in
a journal file beside the state file:

1. ``.<snap>.squibd-journal.<txid>`` is created (O_EXCL, 0600) and locked
   with ``flock`` for the whole save; its *prepare* record names the two
   destinations and the two temp files; journal and directory are fsynced.
2. The temp files are created beside their destinations (or in the staging
   directory) with ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600. The memory
   writer fills ``mem_fd``; the caller hands the encoded state to
   :meth:`PairTransaction.commit`.
3. ``commit`` sizes and fsyncs the memory temp, writes and fsyncs the state
   temp, fsyncs their directories, then appends and fsyncs the *commit*
   record: from here on the new pair wins.
4. Both temps are renamed over the destinations, the directories fsynced,
   and the journal removed.

Recovery (:func:`recover_pair` before a load or save of a path,
:func:`recover_directory` at daemon start) looks at every journal that no
live save holds locked: with a commit record it rolls forward (renames the
temps that still exist), without one it rolls back (removes the temps).
Temps exist only while their journal's prepare record is durable, so a
SIGKILL at any instant leaves, after recovery, the whole old pair or the
whole new pair at the user's paths and no temp files.

Transactions are used from worker threads; one transaction per destination
path at a time in this process (a second one fails with ``Io``/EBUSY).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import secrets
import stat
import threading
import zlib
from collections.abc import Callable, Iterable
from typing import Final

import attrs

from .errors import AtomicCommitCrossFs, AtomicCommitFailed, InvalidPath, Io, MemoryIo
from .paths import validate_path

__all__ = [
    "COMMIT_STEPS",
    "JOURNAL_MARKER",
    "TEMP_MARKER",
    "PairTransaction",
    "StepHook",
    "recover_directory",
    "recover_pair",
]

#: The named instants of a save, in order; a test-only ``step_hook`` is called
#: right after each one (the crash-safety tests SIGKILL the process there).
COMMIT_STEPS: Final = (
    "journal_created",
    "journal_prepared",
    "temps_created",
    "mem_synced",
    "state_written",
    "state_synced",
    "temps_durable",
    "committed",
    "mem_renamed",
    "state_renamed",
    "dirs_synced",
    "journal_removed",
)
JOURNAL_MARKER: Final = ".squibd-journal."
TEMP_MARKER: Final = ".squibd-tmp-"
#: SPEC section 5: temp files are created with mode 0600.
TEMP_MODE: Final = 0o600
_CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Bytes of randomness in a transaction id (hex-encoded in the file names).
_TXID_BYTES: Final = 8
_JOURNAL_VERSION: Final = 1

StepHook = Callable[[str], None]

_active_lock = threading.Lock()
_active_paths: set[str] = set()


def _canonical(path: str) -> str:
    """The destination's identity: resolved parent directory plus base name."""
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _reserve(paths: Iterable[str]) -> bool:
    keys = set(paths)
    with _active_lock:
        if keys & _active_paths:
            return False
        _active_paths.update(keys)
        return True


def _release(paths: Iterable[str]) -> None:
    with _active_lock:
        _active_paths.difference_update(paths)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs(paths: Iterable[str]) -> None:
    for directory in dict.fromkeys(os.path.dirname(p) for p in paths):
        _fsync_dir(directory)


def _record(payload: dict[str, object]) -> bytes:
    text = json.dumps(payload, sort_keys=True)
    return f"{text}\t{zlib.crc32(text.encode()):08x}\n".encode()


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


def _unlink_if_regular(path: str) -> None:
    """Remove a temp we created; never a symlink or anything else planted there."""
    try:
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


@attrs.frozen
class _Plan:
    """What a journal's prepare record says."""

    txid: str
    snapshot_path: str
    mem_file_path: str
    state_tmp: str
    mem_tmp: str

    def to_record(self) -> bytes:
        return _record({"journal": _JOURNAL_VERSION, **attrs.asdict(self)})

    @classmethod
    def from_record(cls, record: dict[str, object]) -> _Plan | None:
        fields = [a.name for a in attrs.fields(cls)]
        if record.get("journal") != _JOURNAL_VERSION:
            return None
        if not all(isinstance(record.get(name), str) for name in fields):
            return None
        return cls(**{name: str(record[name]) for name in fields})


def _recover_journal(journal_path: str) -> None:
    """Roll one journal forward or back unless a live save holds it."""
    try:
        fd = os.open(journal_path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # a live save (maybe in another process) owns it
        if os.fstat(fd).st_nlink == 0:
            return  # someone else finished it while we waited
        size = os.fstat(fd).st_size
        records = _parse_records(os.pread(fd, size, 0))
        plan = _Plan.from_record(records[0]) if records else None
        if plan is not None:
            committed = {"commit": plan.txid} in records[1:]
            if committed:
                for tmp, dest in ((plan.mem_tmp, plan.mem_file_path),
                                  (plan.state_tmp, plan.snapshot_path)):  # fmt: skip
                    if os.path.lexists(tmp) and stat.S_ISREG(os.lstat(tmp).st_mode):
                        os.rename(tmp, dest)
                _fsync_dirs((plan.mem_tmp, plan.state_tmp, plan.mem_file_path, plan.snapshot_path))
            else:
                _unlink_if_regular(plan.mem_tmp)
                _unlink_if_regular(plan.state_tmp)
                _fsync_dirs((plan.mem_tmp, plan.state_tmp))
        os.unlink(journal_path)
        _fsync_dir(os.path.dirname(journal_path))
    finally:
        os.close(fd)


def _journals(directory: str, snapshot_name: str | None) -> list[str]:
    prefix = f".{snapshot_name}{JOURNAL_MARKER}" if snapshot_name is not None else "."
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(
        os.path.join(directory, name)
        for name in names
        if name.startswith(prefix) and JOURNAL_MARKER in name
    )


def _recover_snapshot_journals(snapshot_path: str) -> None:
    directory, name = os.path.split(snapshot_path)
    for journal in _journals(directory, name):
        _recover_journal(journal)


def recover_pair(snapshot_path: str, mem_file_path: str) -> None:
    """Finish or undo any interrupted save of this pair (idempotent).

    Run before loading or saving these paths. Journals a live save holds are
    left alone.

    Raises:
        Io: a rename, unlink or fsync of the recovery failed.
    """
    keys = (_canonical(snapshot_path), _canonical(mem_file_path))
    if not _reserve(keys):
        return  # a save of these paths is running in this process
    try:
        _recover_snapshot_journals(snapshot_path)
    except OSError as exc:
        raise Io(exc) from exc
    finally:
        _release(keys)


def recover_directory(directory: str) -> None:
    """Recover every interrupted save whose journal lies in ``directory``.

    Run at daemon start for every directory snapshots were saved to.

    Raises:
        Io: a rename, unlink or fsync of the recovery failed.
    """
    try:
        for journal in _journals(directory, None):
            snapshot_name = os.path.basename(journal)[1:].split(JOURNAL_MARKER, 1)[0]
            key = _canonical(os.path.join(directory, snapshot_name))
            if not _reserve((key,)):
                continue
            try:
                _recover_journal(journal)
            finally:
                _release((key,))
    except OSError as exc:
        raise Io(exc) from exc


def _check_same_filesystem(dest: str, staging_dir: str) -> None:
    try:
        dest_dev = os.stat(os.path.dirname(dest)).st_dev
        staging_dev = os.stat(staging_dir).st_dev
    except OSError as exc:
        raise Io(exc) from exc
    if dest_dev != staging_dev:
        raise AtomicCommitCrossFs(dest, staging_dir)


def _create_temp(path: str, flags: int) -> int:
    fd = os.open(path, flags | _CREATE_FLAGS, TEMP_MODE)
    os.fchmod(fd, TEMP_MODE)  # exactly 0600 whatever the umask
    return fd


@attrs.define(eq=False)
class PairTransaction:
    """One save of a snapshot pair; a context manager (exit without commit aborts).

    Args:
        snapshot_path: where the state file goes (validated per SPEC 10).
        mem_file_path: where the memory file goes; must differ.
        staging_dir: put the temps here instead of beside the destinations;
            it must be on the destinations' filesystem.
        allowed_roots: passed to :func:`~squibd.snapshot.paths.validate_path`.
        step_hook: test-only; called with each name of ``COMMIT_STEPS``.

    Raises:
        InvalidPath: a path breaks SPEC 10 or both paths name the same file.
        AtomicCommitCrossFs: ``staging_dir`` is on another filesystem
            (raised before anything is written).
        Io: the journal or state temp cannot be created (e.g. EBUSY when
            another save of these paths runs in this process).
        MemoryIo: the memory temp cannot be created.
    """

    snapshot_path: str
    mem_file_path: str
    staging_dir: str | None = attrs.field(default=None, kw_only=True)
    allowed_roots: tuple[str, ...] | None = attrs.field(default=None, kw_only=True)
    step_hook: StepHook | None = attrs.field(default=None, kw_only=True, repr=False)
    #: The temp memory file, opened O_RDWR; the memory writer fills it.
    mem_fd: int = attrs.field(init=False, default=-1)
    mem_tmp_path: str = attrs.field(init=False, default="")
    state_tmp_path: str = attrs.field(init=False, default="")
    txid: str = attrs.field(init=False, default="")
    _state_fd: int = attrs.field(init=False, default=-1)
    _journal_fd: int = attrs.field(init=False, default=-1)
    _journal_path: str = attrs.field(init=False, default="")
    _prepare_len: int = attrs.field(init=False, default=0)
    _keys: tuple[str, str] = attrs.field(init=False, default=("", ""))
    _done: bool = attrs.field(init=False, default=False)
    #: Temp files this transaction created (only these are ever removed by abort).
    _created: list[str] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        snap = validate_path(self.snapshot_path, allowed_roots=self.allowed_roots)
        mem = validate_path(self.mem_file_path, what="mem_file_path",
                            allowed_roots=self.allowed_roots)  # fmt: skip
        self._keys = (_canonical(snap), _canonical(mem))
        if os.path.normpath(snap) == os.path.normpath(mem) or self._keys[0] == self._keys[1]:
            raise InvalidPath("snapshot_path and mem_file_path must be different files")
        if self.staging_dir is not None:
            for dest in (snap, mem):
                _check_same_filesystem(dest, self.staging_dir)
        if not _reserve(self._keys):
            raise Io(errno.EBUSY)
        try:
            _recover_pair_locked(snap)
            self._open()
        except BaseException:
            self._abort_quietly()
            raise

    def _temp_path(self, dest: str, role: str) -> str:
        directory = self.staging_dir or os.path.dirname(dest)
        return os.path.join(directory, f".{os.path.basename(dest)}{TEMP_MARKER}{role}.{self.txid}")

    def _step(self, name: str) -> None:
        if self.step_hook is not None:
            self.step_hook(name)

    def _open(self) -> None:
        self.txid = secrets.token_hex(_TXID_BYTES)
        snap_dir, snap_name = os.path.split(self.snapshot_path)
        self._journal_path = os.path.join(snap_dir, f".{snap_name}{JOURNAL_MARKER}{self.txid}")
        self.state_tmp_path = self._temp_path(self.snapshot_path, "state")
        self.mem_tmp_path = self._temp_path(self.mem_file_path, "mem")
        try:
            self._journal_fd = _create_temp(self._journal_path, os.O_RDWR)
            self._created.append(self._journal_path)
            fcntl.flock(self._journal_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(self._journal_fd).st_nlink == 0:  # another process's recovery took it
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            self._step("journal_created")
            plan = _Plan(self.txid, self.snapshot_path, self.mem_file_path,
                         self.state_tmp_path, self.mem_tmp_path)  # fmt: skip
            record = plan.to_record()
            os.write(self._journal_fd, record)
            self._prepare_len = len(record)
            os.fsync(self._journal_fd)
            _fsync_dir(snap_dir)
            self._step("journal_prepared")
            self._state_fd = _create_temp(self.state_tmp_path, os.O_WRONLY)
            self._created.append(self.state_tmp_path)
        except OSError as exc:
            raise Io(exc) from exc
        try:
            self.mem_fd = _create_temp(self.mem_tmp_path, os.O_RDWR)
            self._created.append(self.mem_tmp_path)
        except OSError as exc:
            raise MemoryIo(exc) from exc
        self._step("temps_created")

    def __enter__(self) -> PairTransaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self.abort()

    def commit(self, state_bytes: bytes, *, mem_size: int | None = None) -> None:
        """Make the new pair durable and put it at the user's paths.

        Args:
            state_bytes: the encoded state file (``encode_state``).
            mem_size: if given, the memory temp is truncated/extended to it.

        Raises:
            MemoryIo: sizing or fsync of the memory temp failed (pair untouched).
            Io: writing or fsync of the state temp failed (pair untouched).
            AtomicCommitFailed: the commit record or a rename failed. If the
                memory file was already renamed, the journal stays and the
                next recovery completes the new pair.
        """
        if self._done:
            raise Io(errno.EBADF)
        try:
            try:
                if mem_size is not None:
                    os.ftruncate(self.mem_fd, mem_size)
                os.fsync(self.mem_fd)
            except OSError as exc:
                raise MemoryIo(exc) from exc
            self._step("mem_synced")
            try:
                view = memoryview(state_bytes)
                while view:
                    view = view[os.write(self._state_fd, view) :]
                self._step("state_written")
                os.fsync(self._state_fd)
                self._step("state_synced")
                _fsync_dirs((self.mem_tmp_path, self.state_tmp_path))
            except OSError as exc:
                raise Io(exc) from exc
            self._step("temps_durable")
            try:
                os.write(self._journal_fd, _record({"commit": self.txid}))
                os.fsync(self._journal_fd)
                self._step("committed")
                os.rename(self.mem_tmp_path, self.mem_file_path)
            except OSError as exc:
                self._uncommit()
                raise AtomicCommitFailed(exc) from exc
        except BaseException:
            self.abort()
            raise
        self._finish()

    def _uncommit(self) -> None:
        """Nothing was renamed yet: drop the commit record so that abort rolls back."""
        try:
            os.ftruncate(self._journal_fd, self._prepare_len)
            os.fsync(self._journal_fd)
        except OSError:
            pass  # abort removes the temps first; a stale commit then finds none

    def _finish(self) -> None:
        self._step("mem_renamed")
        try:
            os.rename(self.state_tmp_path, self.snapshot_path)
            self._step("state_renamed")
            _fsync_dirs((self.mem_file_path, self.snapshot_path,
                         self.mem_tmp_path, self.state_tmp_path))  # fmt: skip
            self._step("dirs_synced")
            os.unlink(self._journal_path)
            _fsync_dir(os.path.dirname(self._journal_path))
            self._step("journal_removed")
        except OSError as exc:
            # The commit record is durable: leave the journal for recovery.
            raise AtomicCommitFailed(exc) from exc
        finally:
            self._done = True
            self._cleanup()

    def abort(self) -> None:
        """Remove the temps and the journal; the user's paths are untouched. Idempotent."""
        if self._done:
            return
        self._done = True
        try:
            temps = [p for p in self._created if p != self._journal_path]
            for path in temps:
                _unlink_if_regular(path)
            _fsync_dirs(temps)
            if self._journal_path in self._created:
                os.unlink(self._journal_path)
                _fsync_dir(os.path.dirname(self._journal_path))
        except OSError as exc:
            raise Io(exc) from exc
        finally:
            self._created.clear()
            self._cleanup()

    def _abort_quietly(self) -> None:
        # The original error matters more; recovery removes any leftovers.
        with contextlib.suppress(Io):
            self.abort()

    def _cleanup(self) -> None:
        for name in ("mem_fd", "_state_fd", "_journal_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        if self._keys[0]:
            _release(self._keys)
            self._keys = ("", "")


def _recover_pair_locked(snapshot_path: str) -> None:
    """Recovery for a caller that already reserved the pair's paths (internal)."""
    try:
        _recover_snapshot_journals(snapshot_path)
    except OSError as exc:
        raise Io(exc) from exc
