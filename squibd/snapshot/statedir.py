"""squibd's private state directory: commit journals and the key that signs them.

Journals used to live beside the snapshots, in directories clients can
write to, so a client could plant one and let recovery rename a file of its
choice. They now live in a directory only the daemon's user can enter
(issue 10, SPEC section 5)::

    <state_dir>/              0700, owned by the daemon's effective uid
        journal.key           0600, 32 random bytes: the HMAC-SHA256 key
        journal/              0700, one file per save in progress
        quarantine/           0700, journals recovery could not complete

The default is ``$SQUIBD_STATE_DIR`` when set (an absolute path), else
``/var/lib/squibd/state`` for root and ``$XDG_STATE_HOME/squibd`` (else
``~/.local/state/squibd``) for anyone else; ``squibd --state-dir DIR`` and
``[server] state_dir`` override it.

One daemon at a time uses a state directory: it holds an exclusive lock on
``daemon.lock`` there (:func:`lock_state_dir`) for as long as it runs, since
two daemons would re-attach the same VM processes and recover each other's
journals.
The daemon calls :func:`configure_state_dir` once at start; library users
that never call it get the default, created on first use.

A state directory that exists but belongs to another user is refused
(:class:`StateDirError`); one with wider permissions is narrowed to 0700.
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
import threading
from collections.abc import Mapping
from typing import Final

import attrs

__all__ = [
    "KEY_BYTES",
    "ROOT_STATE_DIR",
    "STATE_DIR_ENV",
    "StateDir",
    "StateDirBusy",
    "StateDirError",
    "configure_state_dir",
    "current_state_dir",
    "default_state_dir",
    "lock_state_dir",
    "state_dir_path",
]

#: Issue 10: the state directory of a root daemon.
ROOT_STATE_DIR: Final = "/var/lib/squibd/state"
#: The environment variable that names the default state directory.
STATE_DIR_ENV: Final = "SQUIBD_STATE_DIR"
_LOCK_NAME: Final = "daemon.lock"
#: Bytes of the HMAC-SHA256 key.
KEY_BYTES: Final = 32
_KEY_NAME: Final = "journal.key"
_JOURNAL_DIR: Final = "journal"
_QUARANTINE_DIR: Final = "quarantine"
_DIR_MODE: Final = 0o700
_KEY_MODE: Final = 0o600


class StateDirError(OSError):
    """The state directory cannot be created, is not ours, or its key is unusable.

    An ``OSError`` whose ``errno`` is the cause (EACCES for "not ours").
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(code or errno.EACCES, message)

    def __str__(self) -> str:
        return str(self.strerror)


class StateDirBusy(StateDirError):
    """Another daemon holds the state directory's lock."""


def default_state_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> str:
    """The default state directory (see the module doc).

    ``$SQUIBD_STATE_DIR``, else ``/var/lib/squibd/state`` for root, else
    ``$XDG_STATE_HOME/squibd`` (or ``~/.local/state/squibd``). A relative
    ``$SQUIBD_STATE_DIR`` is ignored, as the XDG spec ignores relative values.
    """
    env = os.environ if environ is None else environ
    named = env.get(STATE_DIR_ENV)
    if named and os.path.isabs(named):
        return named
    if (os.geteuid() if euid is None else euid) == 0:
        return ROOT_STATE_DIR
    base = env.get("XDG_STATE_HOME")
    if not base or not os.path.isabs(base):  # the XDG spec ignores relative values
        home = env.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local", "state")
    return os.path.join(base, "squibd")


def _ensure_private_dir(path: str) -> None:
    """Create ``path`` 0700 (parents 0755) or check that the existing one is ours and private."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, _DIR_MODE)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"cannot create state directory {path}: {exc.strerror}",
                            exc.errno) from exc
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        is_link = exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path)
        reason = "it is a symbolic link" if is_link else exc.strerror
        raise StateDirError(f"cannot open state directory {path}: {reason}", exc.errno) from exc
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise StateDirError(
                f"state directory {path} belongs to uid {info.st_uid}, not to squibd's "
                f"uid {os.geteuid()}"
            )
        if stat.S_IMODE(info.st_mode) != _DIR_MODE:
            os.fchmod(fd, _DIR_MODE)
    except OSError as exc:
        raise StateDirError(f"cannot secure state directory {path}: {exc.strerror}",
                            exc.errno) from exc
    finally:
        os.close(fd)


def _read_key(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise StateDirError(f"journal key {path} is not a regular file of squibd's uid")
        if stat.S_IMODE(info.st_mode) != _KEY_MODE:
            os.fchmod(fd, _KEY_MODE)
        key = os.pread(fd, KEY_BYTES + 1, 0)
    finally:
        os.close(fd)
    if len(key) != KEY_BYTES:
        raise StateDirError(f"journal key {path} is {len(key)} bytes, not {KEY_BYTES}")
    return key


def _load_or_create_key(directory: str) -> bytes:
    """The key, created atomically (temp + link) by whichever process comes first."""
    path = os.path.join(directory, _KEY_NAME)
    try:
        key = _read_key(path)
        if key is not None:
            return key
        temp = os.path.join(directory, f".{_KEY_NAME}.{secrets.token_hex(8)}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     _KEY_MODE)  # fmt: skip
        try:
            os.fchmod(fd, _KEY_MODE)
            os.write(fd, secrets.token_bytes(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)  # fails if another process linked its key first
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        key = _read_key(path)
    except StateDirError:
        raise
    except OSError as exc:
        raise StateDirError(f"cannot read or create journal key {path}: {exc.strerror}",
                            exc.errno) from exc
    if key is None:
        raise StateDirError(f"journal key {path} vanished while it was created")
    return key


@attrs.frozen
class StateDir:
    """An opened state directory (see the module doc)."""

    path: str
    key: bytes = attrs.field(repr=False)

    @property
    def journal_dir(self) -> str:
        """Where the journals of saves in progress live."""
        return os.path.join(self.path, _JOURNAL_DIR)

    @property
    def quarantine_dir(self) -> str:
        """Where journals recovery could not complete are moved."""
        return os.path.join(self.path, _QUARANTINE_DIR)

    @classmethod
    def open(cls, path: str) -> StateDir:
        """Create (0700) or check ``path`` and its subdirectories; load or create the key.

        Raises:
            StateDirError: not creatable, owned by another uid, a symlink, or a bad key.
        """
        path = os.path.abspath(path)
        _ensure_private_dir(path)
        real = os.path.realpath(path)
        for sub in (_JOURNAL_DIR, _QUARANTINE_DIR):
            _ensure_private_dir(os.path.join(real, sub))
        return cls(real, _load_or_create_key(real))


def lock_state_dir(state: StateDir) -> int:
    """Take the daemon's exclusive lock on ``state`` (the fd holds it until closed).

    The lock file records the holder's pid, for the message a second daemon gets.

    Raises:
        StateDirBusy: another process holds it.
        StateDirError: the lock file cannot be opened.
    """
    path = os.path.join(state.path, _LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _KEY_MODE)
    except OSError as exc:
        raise StateDirError(f"cannot open {path}: {exc.strerror}", exc.errno) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise StateDirBusy(
            f"state directory {state.path} is in use by another squibd (pid {holder}); "
            "give each daemon its own --state-dir",
            errno.EBUSY,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


_lock = threading.Lock()
_configured: str | None = None
_opened: StateDir | None = None


def configure_state_dir(path: str | None) -> StateDir | None:
    """Use ``path`` as this process's state directory from now on (opened at once).

    ``None`` goes back to the default (opened lazily on first use).

    Raises:
        StateDirError: see :meth:`StateDir.open`.
    """
    global _configured, _opened
    opened = None if path is None else StateDir.open(path)
    with _lock:
        _configured = None if opened is None else opened.path
        _opened = opened
    return opened


def state_dir_path() -> str:
    """The state directory's path (configured or default), without creating it."""
    with _lock:
        return _configured if _configured is not None else default_state_dir()


def current_state_dir() -> StateDir:
    """The opened state directory (the default one is opened on first use).

    Raises:
        StateDirError: see :meth:`StateDir.open`.
    """
    global _opened
    with _lock:
        if _opened is not None:
            return _opened
        path = _configured if _configured is not None else default_state_dir()
    opened = StateDir.open(path)
    with _lock:
        if _opened is None:
            _opened = opened
        return _opened
