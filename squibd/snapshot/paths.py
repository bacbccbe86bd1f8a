"""Validation of paths that come from clients (SPEC section 10).

A client path is non-empty, valid UTF-8, at most 1024 bytes, free of NUL,
absolute and without a ``..`` component; a Unix socket path is at most 107
bytes. With ``allowed_roots`` configured, the path's parent directory, fully
resolved, must lie inside one of the roots (also resolved). Failures raise
:class:`~squibd.snapshot.errors.InvalidPath` whose reason says which rule
broke, e.g. ``invalid snapshot path: snapshot_path must be absolute``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final

from .errors import InvalidPath

__all__ = [
    "MAX_PATH_BYTES",
    "MAX_SOCKET_PATH_BYTES",
    "is_within",
    "validate_path",
]

#: SPEC section 10: client paths are at most 1024 bytes (UTF-8).
MAX_PATH_BYTES: Final = 1024
#: SPEC section 10 / linux/un.h: ``sun_path[108]`` leaves 107 bytes plus NUL.
MAX_SOCKET_PATH_BYTES: Final = 107


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
    if allowed_roots is not None:
        parent = os.path.realpath(os.path.dirname(path))
        roots = [os.path.realpath(root) for root in allowed_roots]
        if not any(is_within(parent, root) for root in roots):
            raise InvalidPath(f"{what} is outside the allowed roots")
    return path
