"""Validation of paths that come from clients (SPEC section 10).

A client path is non-empty, valid UTF-8, at most 1024 bytes, free of NUL,
absolute and without a ``..`` component; a Unix socket path is at most 107
bytes. With ``allowed_roots`` configured, the path's parent directory, fully
resolved, must lie inside one of the roots (also resolved). Failures raise
:class:`~squibd.snapshot.errors.InvalidPath` whose reason says which rule
broke, e.g. ``invalid snapshot path: snapshot_path must be absolute``.

Beyond SPEC 10 (issue 10):

- a base name that uses squibd's reserved temp or journal markers is refused,
  as is squibd's journal key and anything in the state directory's
  ``journal`` and ``quarantine`` folders;
- :func:`open_client_file` is the one way a client-named file is opened for
  reading: one path resolution that never follows a final symlink (``O_PATH |
  O_NOFOLLOW``), ``fstat`` on that fd (a regular file, else InvalidPath naming
  what it is: symlink, directory, FIFO, socket, device), the real location of
  that very inode checked against the roots, and only then a read-only
  reopen of the same inode through ``/proc/self/fd`` with ``O_NONBLOCK`` (a
  FIFO or a device is never opened for reading, so nothing blocks);
- :func:`open_dest_dir` opens a destination's parent directory once and
  checks where that directory really is; the pair commit then works relative
  to the directory fd, so swapping a parent for a symlink mid-save changes
  nothing; both check the daemon's roots (:func:`set_daemon_roots`) even
  when the caller passes none;
- :func:`check_destination` refuses an existing destination that is not a
  regular file (directory, FIFO, symlink, ...), before anything is written.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from typing import Final

from .errors import InvalidPath
from .statedir import state_dir_path

__all__ = [
    "JOURNAL_MARKER",
    "MAX_PATH_BYTES",
    "MAX_SOCKET_PATH_BYTES",
    "RESERVED_MARKERS",
    "TEMP_MARKER",
    "check_destination",
    "file_kind",
    "is_within",
    "open_client_file",
    "open_dest_dir",
    "set_daemon_roots",
    "validate_path",
]

#: SPEC section 10: client paths are at most 1024 bytes (UTF-8).
MAX_PATH_BYTES: Final = 1024
#: SPEC section 10 / linux/un.h: ``sun_path[108]`` leaves 107 bytes plus NUL.
MAX_SOCKET_PATH_BYTES: Final = 107
#: squibd's temp files are named ``.<dest>.squibd-tmp-<role>.<txid>``.
TEMP_MARKER: Final = ".squibd-tmp-"
#: Journals were once named ``.<snap>.squibd-journal.<txid>`` beside the pair.
JOURNAL_MARKER: Final = ".squibd-journal."
#: A client path whose base name contains one of these is refused.
RESERVED_MARKERS: Final = (TEMP_MARKER, JOURNAL_MARKER)
_O_PATH: Final = getattr(os, "O_PATH", 0o10000000)
_READ_FLAGS: Final = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def is_within(path: str, root: str) -> bool:
    """True when ``path`` equals ``root`` or lies below it (both already resolved)."""
    return os.path.commonpath((path, root)) == root


def validate_path(
    path: object,
    *,
    what: str = "snapshot_path",
    socket: bool = False,
    allowed_roots: Sequence[str] | None = None,
) -> str:
    """Check a client-supplied path against SPEC section 10.

    Args:
        path: the value the client sent (anything; non-strings are refused).
        what: the parameter name used in the error reason.
        socket: apply the 107-byte limit of a Unix socket path.
        allowed_roots: if given (even empty), the resolved parent directory
            must lie inside one of these directories.

    Returns:
        The path, unchanged.

    Raises:
        InvalidPath: with a reason naming ``what`` and the broken rule.
    """
    if not isinstance(path, str):
        raise InvalidPath(f"{what} must be a string")
    if not path:
        raise InvalidPath(f"{what} is empty")
    if "\0" in path:
        raise InvalidPath(f"{what} contains a NUL byte")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidPath(f"{what} is not valid UTF-8") from exc
    limit = MAX_SOCKET_PATH_BYTES if socket else MAX_PATH_BYTES
    if len(encoded) > limit:
        raise InvalidPath(f"{what} is {len(encoded)} bytes long, more than {limit}")
    if not path.startswith("/"):
        raise InvalidPath(f"{what} must be absolute")
    if ".." in path.split("/"):
        raise InvalidPath(f"{what} must not contain a '..' component")
    if path.endswith("/"):
        raise InvalidPath(f"{what} names a directory, not a file")
    name = os.path.basename(path)
    if not socket and any(marker in name for marker in RESERVED_MARKERS):
        raise InvalidPath(f"{what} uses a file name reserved for squibd's temp and journal files")
    if not socket or allowed_roots is not None:
        _check_location(os.path.realpath(os.path.dirname(path)), what, allowed_roots, name=name)
    return path


_daemon_roots: tuple[str, ...] | None = None


def set_daemon_roots(roots: Sequence[str] | None) -> None:
    """The daemon's ``allowed_roots``, enforced by every open of this module.

    :func:`open_client_file` and :func:`open_dest_dir` called without
    ``allowed_roots`` check the file's real location against these roots
    (plus the state directory, for squibd's own files there), so the check
    holds at the very open even where a caller does not pass the roots.
    ``None`` (the default, and offline tools) means no roots.
    """
    global _daemon_roots
    _daemon_roots = None if roots is None else tuple(roots)


#: Entries of the state directory no client path may name (the key, its temps, the folders).
_PROTECTED_NAMES: Final = ("journal.key", "journal", "quarantine")


def _protected(real_dir: str, name: str | None) -> bool:
    """True for the state directory's key and anything in its journal or quarantine folders."""
    state = os.path.realpath(state_dir_path())
    if any(is_within(real_dir, os.path.join(state, folder)) for folder in _PROTECTED_NAMES[1:]):
        return True
    if real_dir != state:
        return False
    return name is None or name in _PROTECTED_NAMES or name.startswith(".journal.key")


def _check_location(
    real_dir: str,
    what: str,
    allowed_roots: Sequence[str] | None,
    *,
    at_open: bool = False,
    name: str | None = None,
) -> None:
    """``real_dir`` (resolved) must lie inside a root and away from squibd's journals and key.

    ``name`` is the base name in ``real_dir`` (None: the directory itself is meant).
    """
    if _protected(real_dir, name):
        raise InvalidPath(f"{what} is inside squibd's private state directory")
    state = os.path.realpath(state_dir_path())
    roots: Sequence[str] | None = allowed_roots
    if roots is None and at_open and _daemon_roots is not None:
        roots = (*_daemon_roots, state)
    if roots is not None:
        resolved = [os.path.realpath(root) for root in roots]
        if not any(is_within(real_dir, root) for root in resolved):
            raise InvalidPath(f"{what} is outside the allowed roots")


def _fd_path(fd: int) -> str:
    """Where the inode behind ``fd`` really is (its path as the kernel knows it)."""
    return os.readlink(f"/proc/self/fd/{fd}")


def file_kind(mode: int) -> str:
    """A short description of a file type, for error reasons."""
    kinds = (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def open_client_file(
    path: str, what: str = "snapshot_path", allowed_roots: Sequence[str] | None = None
) -> int:
    """Open a client-named file for reading, safely (see the module doc).

    Args:
        path: the client's path (checked with :func:`validate_path` first).
        what: the parameter name used in error reasons.
        allowed_roots: if given, the file's real directory must lie inside one.

    Returns:
        A read-only, close-on-exec fd of a regular file; the caller closes it.

    Raises:
        InvalidPath: a SPEC 10 rule broke, the last component is a symlink,
            or the file is a directory, FIFO, socket or device.
        OSError: the file cannot be opened (missing, permissions, ...).
    """
    validate_path(path, what=what)
    try:
        path_fd = os.open(path, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            raise InvalidPath(f"{what} has a parent that is not a directory") from exc
        raise
    try:
        info = os.fstat(path_fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidPath(f"{what} is {file_kind(info.st_mode)}, not a regular file")
        real_path = _fd_path(path_fd)
        _check_location(os.path.dirname(real_path), what, allowed_roots, at_open=True,
                        name=os.path.basename(real_path))  # fmt: skip
        fd = os.open(f"/proc/self/fd/{path_fd}", _READ_FLAGS)
    finally:
        os.close(path_fd)
    reopened = os.fstat(fd)
    if (reopened.st_dev, reopened.st_ino) != (info.st_dev, info.st_ino):  # pragma: no cover
        os.close(fd)
        raise InvalidPath(f"{what} changed while it was opened")
    return fd


def open_dest_dir(
    path: str, what: str = "snapshot_path", allowed_roots: Sequence[str] | None = None
) -> tuple[int, str]:
    """Open the parent directory of destination ``path`` once and check where it really is.

    Returns:
        ``(dir_fd, real_dir)``: an fd of the directory (the caller closes it)
        and its resolved path.

    Raises:
        InvalidPath: the directory is missing or not a directory, or lies
            outside the roots or inside the state directory.
    """
    directory = os.path.dirname(path)
    try:
        fd = os.open(directory, _DIR_FLAGS)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            raise InvalidPath(f"{what} is in a directory that does not exist") from exc
        raise
    try:
        real = _fd_path(fd)
        _check_location(real, what, allowed_roots, at_open=True, name=os.path.basename(path))
    except BaseException:
        os.close(fd)
        raise
    return fd, real


def check_destination(dir_fd: int, name: str, what: str = "snapshot_path") -> None:
    """Refuse an existing destination that is not a regular file (nothing is written).

    Raises:
        InvalidPath: ``name`` in ``dir_fd`` is a directory, symlink, FIFO, socket or device.
    """
    try:
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(info.st_mode):
        raise InvalidPath(f"{what} exists and is {file_kind(info.st_mode)}, not a regular file")
