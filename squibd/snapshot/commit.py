"""The pair commit: one save of a snapshot pair (SPEC section 5, items 4-7).

Theory of operation. Two files cannot be renamed atomically together, so a
save is a small write-ahead transaction whose commit point is one record in
a journal beside the state file (``journal.py`` holds the journal format and
the recovery):

1. ``.<snap>.squibd-journal.<txid>`` is created (O_EXCL, 0600) and locked
   with ``flock`` for the whole save; its *prepare* record names the two
   destinations and the two temp files; journal and directory are fsynced.
2. The temp files are created beside their destinations (or in the staging
   directory) with ``O_CREAT|O_EXCL|O_NOFOLLOW``, mode 0600. The memory
   writer fills ``mem_fd`` (and may set the ``user.squibd.pair`` xattr on
   it); the caller hands the encoded state to :meth:`PairTransaction.commit`.
3. ``commit`` sizes and fsyncs the memory temp, writes and fsyncs the state
   temp, fsyncs their directories, then appends and fsyncs the *commit*
   record: from here on the new pair wins.
4. Both temps are renamed over the destinations, the directories fsynced,
   and the journal removed.

Temps exist only while their journal's prepare record is durable, so a
SIGKILL at any instant leaves, after recovery (:func:`recover_pair` before a
load or save of the paths, :func:`recover_directory` at daemon start), the
whole old pair or the whole new pair at the user's paths and no temp files.

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
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from .errors import AtomicCommitCrossFs, AtomicCommitFailed, InvalidPath, Io, MemoryIo
from .journal import (
    JOURNAL_MARKER,
    TEMP_MARKER,
    JournalPlan,
    canonical_path,
    commit_record,
    fsync_dir,
    fsync_dirs,
    journal_path_for,
    recover_directory,
    recover_pair,
    recover_reserved,
    release_paths,
    reserve_paths,
    temp_path_for,
    unlink_if_ours,
)
from .paths import validate_path

__all__ = [
    "COMMIT_STEPS",
    "JOURNAL_MARKER",
    "TEMP_MARKER",
    "TEMP_MODE",
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
#: SPEC section 5: temp files are created with mode 0600.
TEMP_MODE: Final = 0o600
#: SPEC sections 5 and 10: never follow a symlink, never reuse an existing file.
_CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Bytes of randomness in a transaction id (hex-encoded in the file names).
_TXID_BYTES: Final = 8

StepHook = Callable[[str], None]


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
    allowed_roots: Sequence[str] | None = attrs.field(default=None, kw_only=True)
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
        self._keys = (canonical_path(snap), canonical_path(mem))
        if os.path.normpath(snap) == os.path.normpath(mem) or self._keys[0] == self._keys[1]:
            raise InvalidPath("snapshot_path and mem_file_path must be different files")
        if self.staging_dir is not None:
            for dest in (snap, mem):
                _check_same_filesystem(dest, self.staging_dir)
        if not reserve_paths(self._keys, for_save=True):
            raise Io(errno.EBUSY)
        try:
            recover_reserved(snap)
            self._open()
        except BaseException:
            self._abort_quietly()
            raise

    def _step(self, name: str) -> None:
        if self.step_hook is not None:
            self.step_hook(name)

    def _open(self) -> None:
        self.txid = secrets.token_hex(_TXID_BYTES)
        self._journal_path = journal_path_for(self.snapshot_path, self.txid)
        staging = self.staging_dir
        self.state_tmp_path = temp_path_for(self.snapshot_path, "state", self.txid, staging)
        self.mem_tmp_path = temp_path_for(self.mem_file_path, "mem", self.txid, staging)
        try:
            self._journal_fd = _create_temp(self._journal_path, os.O_RDWR)
            self._created.append(self._journal_path)
            fcntl.flock(self._journal_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(self._journal_fd).st_nlink == 0:  # another process's recovery took it
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
            self._step("journal_created")
            plan = JournalPlan(self.txid, self.snapshot_path, self.mem_file_path,
                               self.state_tmp_path, self.mem_tmp_path)  # fmt: skip
            record = plan.to_record()
            os.write(self._journal_fd, record)
            self._prepare_len = len(record)
            os.fsync(self._journal_fd)
            fsync_dir(os.path.dirname(self._journal_path))
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
                fsync_dirs((self.mem_tmp_path, self.state_tmp_path))
            except OSError as exc:
                raise Io(exc) from exc
            self._step("temps_durable")
            try:
                os.write(self._journal_fd, commit_record(self.txid))
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
            fsync_dirs((self.mem_file_path, self.snapshot_path,
                         self.mem_tmp_path, self.state_tmp_path))  # fmt: skip
            self._step("dirs_synced")
            os.unlink(self._journal_path)
            fsync_dir(os.path.dirname(self._journal_path))
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
                unlink_if_ours(path)
            fsync_dirs(temps)
            if self._journal_path in self._created:
                os.unlink(self._journal_path)
                fsync_dir(os.path.dirname(self._journal_path))
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
            release_paths(self._keys)
            self._keys = ("", "")
