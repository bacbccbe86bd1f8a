"""The pair commit: one save of a snapshot pair (SPEC section 5, items 4-7).

Theory of operation. Two files cannot be renamed atomically together, so a
save is a small write-ahead transaction whose commit point is one record in
a journal in squibd's private state directory (``journal.py`` holds the
journal format and the recovery, ``statedir.py`` the directory and its key):

0. Before anything is written: both paths are validated (SPEC 10, reserved
   names), their parent directories are opened once and checked to lie
   inside the allowed roots (every later create, rename and unlink is made
   relative to those directory fds), and an existing destination that is not
   a regular file (directory, FIFO, symlink, ...) is refused with InvalidPath.
1. ``<state_dir>/journal/<key>.<txid>.journal`` is created (O_EXCL, 0600)
   and locked with ``flock`` for the whole save; its signed *prepare* record
   names the two destinations, the two temp files and the identity of their
   directories; journal and its directory are fsynced.
2. The temp files are created beside their destinations (or in the staging
   directory) with ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600. The memory
   writer fills ``mem_fd`` (and may set the ``user.squibd.pair`` xattr on
   it); the caller hands the encoded state to :meth:`PairTransaction.commit`.
3. ``commit`` sizes and fsyncs the memory temp, writes and fsyncs the state
   temp, fsyncs their directories, checks the destinations again, then
   appends and fsyncs the signed *commit* record (naming the temps' inodes):
   from here on the new pair wins.
4. Both temps are renamed over the destinations, the directories fsynced,
   and the journal removed.

Temps exist only while their journal's prepare record is durable, so a
SIGKILL at any instant leaves, after recovery (:func:`recover_pair` before a
load or save of the paths, :func:`recover_all` at daemon start), the whole
old pair or the whole new pair at the user's paths and no temp files.

Cancellation: ``cancel`` (a ``threading.Event``) is checked at each named
step before ``committed`` and by :meth:`PairTransaction.check_cancelled`,
which the writer filling ``mem_fd`` calls between its pieces; when set, the
transaction aborts (temps and journal removed, the old pair untouched) and
raises :class:`PairCancelled`. From the commit record on the event is never
looked at: a commit is not undone. ``step_hook`` is for tests only.

Thread use: a transaction may be driven from any worker thread (one at a
time); one transaction per destination path at a time in this process (a
second one fails with ``Io``/EBUSY rather than interleave renames).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from .errors import AtomicCommitCrossFs, AtomicCommitFailed, InvalidPath, Io, MemoryIo
from .journal import (
    JOURNAL_MARKER,
    TEMP_MARKER,
    JournalPlan,
    commit_record,
    fsync_dir,
    journal_name,
    recover_all,
    recover_directory,
    recover_pair,
    recover_reserved,
    release_paths,
    reserve_paths,
    temp_path_for,
    unlink_if_ours,
)
from .paths import check_destination, open_dest_dir, validate_path
from .statedir import StateDir, current_state_dir

__all__ = [
    "COMMIT_POINT",
    "COMMIT_STEPS",
    "JOURNAL_MARKER",
    "TEMP_MARKER",
    "TEMP_MODE",
    "PairCancelled",
    "PairTransaction",
    "StepHook",
    "recover_all",
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
#: The step after which the new pair wins: cancellation is not checked from here on.
COMMIT_POINT: Final = "committed"
#: SPEC section 5: temp files are created with mode 0600.
TEMP_MODE: Final = 0o600
#: SPEC sections 5 and 10: never follow a symlink, never reuse an existing file.
_CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
#: Bytes of randomness in a transaction id (hex-encoded in the file names).
_TXID_BYTES: Final = 8

StepHook = Callable[[str], None]


class PairCancelled(Exception):
    """The transaction's cancel event was set before the commit point; it was aborted."""

    def __init__(self) -> None:
        super().__init__("the save was cancelled before its commit; the previous pair is intact")


def _create_temp(name: str, flags: int, dir_fd: int | None = None) -> int:
    fd = os.open(name, flags | _CREATE_FLAGS, TEMP_MODE, dir_fd=dir_fd)
    os.fchmod(fd, TEMP_MODE)  # exactly 0600 whatever the umask
    return fd


@attrs.define
class _Dir:
    """A directory of the save, opened once: its fd and where it really is."""

    fd: int
    real: str


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
        cancel: when set before the commit point, the transaction aborts and
            raises :class:`PairCancelled` (checked at each step and by
            :meth:`check_cancelled`).
        state_dir: where the journal goes (default: the process's state dir).

    Raises:
        InvalidPath: a path breaks SPEC 10, uses a reserved name, lies in a
            missing directory, names an existing non-regular file, or both
            paths name the same file (raised before anything is written).
        AtomicCommitCrossFs: ``staging_dir`` is on another filesystem
            (raised before anything is written).
        Io: the journal or state temp cannot be created (e.g. EBUSY when
            another save of these paths runs in this process).
        MemoryIo: the memory temp cannot be created.
        PairCancelled: ``cancel`` was set (raised after the abort).
    """

    snapshot_path: str
    mem_file_path: str
    staging_dir: str | None = attrs.field(default=None, kw_only=True)
    allowed_roots: Sequence[str] | None = attrs.field(default=None, kw_only=True)
    step_hook: StepHook | None = attrs.field(default=None, kw_only=True, repr=False)
    cancel: threading.Event | None = attrs.field(default=None, kw_only=True, repr=False)
    state_dir: StateDir | None = attrs.field(default=None, kw_only=True, repr=False)
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
    _reserved: bool = attrs.field(init=False, default=False)
    _done: bool = attrs.field(init=False, default=False)
    _committed: bool = attrs.field(init=False, default=False)
    _snap_dir: _Dir | None = attrs.field(init=False, default=None)
    _mem_dir: _Dir | None = attrs.field(init=False, default=None)
    _stage_dir: _Dir | None = attrs.field(init=False, default=None)
    #: Temp files this transaction created, as (directory, name): only these
    #: are ever removed by abort.
    _created: list[tuple[_Dir, str]] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        try:
            self._check_and_open_dirs()
            if not reserve_paths(self._keys, for_save=True, cancel=self.cancel):
                self.check_cancelled()  # the wait ended because of a cancel
                raise Io(errno.EBUSY)
            self._reserved = True
            try:
                self.state_dir = self.state_dir or current_state_dir()
            except OSError as exc:  # StateDirError
                raise Io(exc) from exc
            recover_reserved(self._keys[0], self.state_dir)
            self._open()
        except BaseException:
            self._abort_quietly()
            raise

    def _check_and_open_dirs(self) -> None:
        """Every check that can refuse the save, before anything is written."""
        roots = self.allowed_roots
        snap = validate_path(self.snapshot_path, allowed_roots=roots)
        mem = validate_path(self.mem_file_path, what="mem_file_path", allowed_roots=roots)
        if os.path.normpath(snap) == os.path.normpath(mem):
            raise InvalidPath("snapshot_path and mem_file_path must be different files")
        self._snap_dir = self._open_dest(snap, "snapshot_path")
        self._mem_dir = self._open_dest(mem, "mem_file_path")
        self._keys = (os.path.join(self._snap_dir.real, os.path.basename(snap)),
                      os.path.join(self._mem_dir.real, os.path.basename(mem)))  # fmt: skip
        if self._keys[0] == self._keys[1]:
            raise InvalidPath("snapshot_path and mem_file_path must be different files")
        check_destination(self._snap_dir.fd, os.path.basename(snap), "snapshot_path")
        check_destination(self._mem_dir.fd, os.path.basename(mem), "mem_file_path")
        if self.staging_dir is not None:
            try:
                fd = os.open(self.staging_dir, _DIR_FLAGS)
            except OSError as exc:
                raise Io(exc) from exc
            self._stage_dir = _Dir(fd, os.readlink(f"/proc/self/fd/{fd}"))
            staging_dev = os.fstat(fd).st_dev
            for dest, directory in ((snap, self._snap_dir), (mem, self._mem_dir)):
                if os.fstat(directory.fd).st_dev != staging_dev:
                    raise AtomicCommitCrossFs(dest, self.staging_dir)

    def _open_dest(self, path: str, what: str) -> _Dir:
        try:
            fd, real = open_dest_dir(path, what, self.allowed_roots)
        except OSError as exc:
            raise Io(exc) from exc
        return _Dir(fd, real)

    def _step(self, name: str) -> None:
        if name == COMMIT_POINT:
            self._committed = True
        if self.step_hook is not None:
            self.step_hook(name)
        self.check_cancelled()

    def check_cancelled(self) -> None:
        """Raise :class:`PairCancelled` if ``cancel`` is set and the commit point is not passed.

        The caller's ``with`` (or ``commit``) then aborts the transaction.
        """
        if self.cancel is not None and not self._committed and self.cancel.is_set():
            raise PairCancelled

    def _temp_dirs(self) -> tuple[_Dir, _Dir]:
        """The directories of the state temp and the memory temp."""
        assert self._snap_dir is not None and self._mem_dir is not None
        if self._stage_dir is not None:
            return self._stage_dir, self._stage_dir
        return self._snap_dir, self._mem_dir

    def _all_dirs(self) -> list[_Dir]:
        dirs = [self._snap_dir, self._mem_dir, self._stage_dir]
        return list({d.real: d for d in dirs if d is not None}.values())

    def _open(self) -> None:
        assert self.state_dir is not None
        self.txid = secrets.token_hex(_TXID_BYTES)
        state_dir, mem_dir = self._temp_dirs()
        self.state_tmp_path = temp_path_for(self._keys[0], "state", self.txid, state_dir.real)
        self.mem_tmp_path = temp_path_for(self._keys[1], "mem", self.txid, mem_dir.real)
        self._journal_path = os.path.join(
            self.state_dir.journal_dir, journal_name(self._keys[0], self.txid)
        )
        try:
            self._journal_fd = _create_temp(self._journal_path, os.O_RDWR)
            fcntl.flock(self._journal_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(self._journal_fd).st_nlink == 0:  # another process's recovery took it
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            self._step("journal_created")
            dirs = tuple((d.real, *_identity(d.fd)) for d in self._all_dirs())
            plan = JournalPlan(self.txid, self._keys[0], self._keys[1],
                               self.state_tmp_path, self.mem_tmp_path, dirs)  # fmt: skip
            record = plan.to_record(self.state_dir.key)
            os.write(self._journal_fd, record)
            self._prepare_len = len(record)
            os.fsync(self._journal_fd)
            fsync_dir(self.state_dir.journal_dir)
            self._step("journal_prepared")
            name = os.path.basename(self.state_tmp_path)
            self._state_fd = _create_temp(name, os.O_WRONLY, state_dir.fd)
            self._created.append((state_dir, name))
        except OSError as exc:
            raise Io(exc) from exc
        try:
            name = os.path.basename(self.mem_tmp_path)
            self.mem_fd = _create_temp(name, os.O_RDWR, mem_dir.fd)
            self._created.append((mem_dir, name))
        except OSError as exc:
            raise MemoryIo(exc) from exc
        self._step("temps_created")

    def __enter__(self) -> PairTransaction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._done:
            self.abort()

    def _sync_temp_dirs(self) -> None:
        for directory in {d.real: d for d in self._temp_dirs()}.values():
            os.fsync(directory.fd)

    def commit(self, state_bytes: bytes, *, mem_size: int | None = None) -> None:
        """Make the new pair durable and put it at the user's paths.

        Args:
            state_bytes: the encoded state file (``encode_state``).
            mem_size: if given, the memory temp is truncated/extended to it.

        Raises:
            MemoryIo: sizing or fsync of the memory temp failed (pair untouched).
            Io: writing or fsync of the state temp failed (pair untouched).
            InvalidPath: a destination became a non-regular file meanwhile
                (pair untouched).
            AtomicCommitFailed: the commit record or a rename failed. If the
                memory file was already renamed, the journal stays and the
                next recovery completes the new pair.
            PairCancelled: ``cancel`` was set before the commit record (pair
                untouched).
        """
        if self._done or self.state_dir is None:
            raise Io(errno.EBADF)
        assert self._snap_dir is not None and self._mem_dir is not None
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
                self._sync_temp_dirs()
            except OSError as exc:
                raise Io(exc) from exc
            self._step("temps_durable")
            try:
                check_destination(self._snap_dir.fd, os.path.basename(self._keys[0]))
                check_destination(self._mem_dir.fd, os.path.basename(self._keys[1]),
                                  "mem_file_path")  # fmt: skip
            except OSError as exc:
                raise Io(exc) from exc
            try:
                temp_ids = (_identity(self.mem_fd), _identity(self._state_fd))
                os.write(self._journal_fd, commit_record(self.state_dir.key, self.txid, temp_ids))
                os.fsync(self._journal_fd)
                self._step("committed")
                _, mem_dir = self._temp_dirs()
                os.rename(os.path.basename(self.mem_tmp_path), os.path.basename(self._keys[1]),
                          src_dir_fd=mem_dir.fd, dst_dir_fd=self._mem_dir.fd)  # fmt: skip
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
        assert self._snap_dir is not None and self.state_dir is not None
        self._step("mem_renamed")
        try:
            state_dir, _ = self._temp_dirs()
            os.rename(os.path.basename(self.state_tmp_path), os.path.basename(self._keys[0]),
                      src_dir_fd=state_dir.fd, dst_dir_fd=self._snap_dir.fd)  # fmt: skip
            self._step("state_renamed")
            for directory in self._all_dirs():
                os.fsync(directory.fd)
            self._step("dirs_synced")
            os.unlink(self._journal_path)
            fsync_dir(self.state_dir.journal_dir)
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
            for directory, name in self._created:
                unlink_if_ours(name, directory.fd)
            for directory in {d.real: d for d, _ in self._created}.values():
                os.fsync(directory.fd)
            if self._journal_fd >= 0 and self.state_dir is not None:
                os.unlink(self._journal_path)
                fsync_dir(self.state_dir.journal_dir)
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
        for attr in ("_snap_dir", "_mem_dir", "_stage_dir"):
            directory = getattr(self, attr)
            if directory is not None:
                os.close(directory.fd)
                setattr(self, attr, None)
        if self._reserved:
            release_paths(self._keys)
            self._reserved = False


def _identity(fd: int) -> tuple[int, int]:
    info = os.fstat(fd)
    return info.st_dev, info.st_ino
