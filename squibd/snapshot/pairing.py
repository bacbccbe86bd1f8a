"""Pair identity of a memory file (SPEC section 4).

A pair id is a random UUID recorded in the manifest and, where the
filesystem keeps user extended attributes, in the memory file's
``user.squibd.pair`` xattr, so that a state file is never loaded with the
memory file of another pair.
"""

from __future__ import annotations

import errno
import os
import uuid
from typing import Final

from .errors import MemoryIo

__all__ = ["PAIR_XATTR", "new_pair_id", "read_pair_xattr", "set_pair_xattr"]

#: SPEC section 4: the extended attribute binding a memory file to its pair.
PAIR_XATTR: Final = "user.squibd.pair"
#: Errors meaning "this filesystem keeps no user xattrs": not a failure.
_XATTR_UNSUPPORTED: Final = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM})


def new_pair_id() -> str:
    """A fresh random pair id (SPEC section 4: a random UUID)."""
    return str(uuid.uuid4())


def set_pair_xattr(fd: int, pair_id: str) -> bool:
    """Store ``pair_id`` in the ``user.squibd.pair`` xattr; False where unsupported.

    Raises:
        MemoryIo: any other failure of ``fsetxattr``.
    """
    try:
        os.setxattr(fd, PAIR_XATTR, pair_id.encode())
    except OSError as error:
        if error.errno in _XATTR_UNSUPPORTED:
            return False
        raise MemoryIo(error) from error
    return True


def read_pair_xattr(path_or_fd: str | int) -> str | None:
    """The pair id stored on a memory file, or None when absent or unsupported."""
    try:
        return os.getxattr(path_or_fd, PAIR_XATTR).decode(errors="replace")
    except OSError as error:
        if error.errno in _XATTR_UNSUPPORTED or error.errno == errno.ENODATA:
            return None
        raise MemoryIo(error) from error
