"""Memory-file failures that are not a plain OS error, as ``MemoryIo`` kinds.

SPEC section 2 has one kind for the memory file, ``MemoryIo``
(``memory file I/O error: {io}``). Bad input to the memory-file code (a run
outside its region, a bitmap of the wrong size), a digest mismatch and a
memory file of another pair are reported under that kind with the errno
that fits (``EINVAL`` for bad input and pair/size mismatches, ``EIO`` for
corrupt data) and the reason appended after ``"; "``, so the wire prefix
stays the contract's while the message says what went wrong and where.
"""

from __future__ import annotations

import errno

from .errors import MemoryIo

__all__ = [
    "MemoryDigestMismatch",
    "MemoryInputInvalid",
    "MemoryPairMismatch",
    "MemoryReasonError",
]


class MemoryReasonError(MemoryIo):
    """A ``MemoryIo`` with a reason after the OS error text."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code)
        self.reason = reason
        self._message = f"{self._message}; {reason}"
        self.args = (self._message,)


class MemoryInputInvalid(MemoryReasonError):
    """Bad input to the memory-file code: sizes, pages or runs that do not fit."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EINVAL, reason)


class MemoryPairMismatch(MemoryReasonError):
    """The memory file belongs to another pair, or its size differs from the manifest."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EINVAL, reason)


class MemoryDigestMismatch(MemoryReasonError):
    """A chunk of the memory file does not match its digest; ``offset`` names the chunk."""

    def __init__(self, offset: int, length: int) -> None:
        self.offset = offset
        self.length = length
        super().__init__(
            errno.EIO,
            f"digest mismatch in the chunk at offset {offset} ({offset:#x}), length {length}",
        )
