"""Errors of lazy restore, one class per cause.

``UffdError`` is the base. Errors on the VMM side (``UffdUnsupported``,
``PageServerUnavailable``, ``HandshakeFailed``) are raised by
``UffdBackend.connect`` before any vCPU runs. Errors on the page-server side
(``SnapshotMismatch``, ``ChunkCorrupt``, ``HandshakeInvalid``) stop the page
server: it never feeds memory it cannot vouch for.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ChunkCorrupt",
    "HandshakeFailed",
    "HandshakeInvalid",
    "PageServerUnavailable",
    "SnapshotMismatch",
    "UffdError",
    "UffdUnsupported",
]


class UffdError(Exception):
    """Base of every lazy-restore error."""

    #: The wire ``data.kind`` of this error (its class name), for the API's error mapping.
    kind: ClassVar[str] = "UffdError"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.kind = cls.__name__


class UffdUnsupported(UffdError):
    """The kernel refused to create or configure a userfaultfd."""

    def __init__(self, what: str, errno_name: str) -> None:
        super().__init__(
            f"userfaultfd is not usable: {what} failed with {errno_name}; "
            "run as root or set vm.unprivileged_userfaultfd=1, or use the File backend"
        )


class PageServerUnavailable(UffdError):
    """The page server's socket is absent or refuses connections."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(
            f"the page server at {path!r} is unavailable ({reason}); "
            "start it (squibd --page-server ...) before loading with backend Uffd"
        )


class HandshakeFailed(UffdError):
    """The page server closed the socket or refused the handshake."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"the handshake with the page server at {path!r} failed: {reason}")


class HandshakeInvalid(UffdError):
    """The page server received a handshake it cannot use (bad JSON, no fd, bad regions)."""


class SnapshotMismatch(UffdError):
    """The snapshot files given to the page server do not belong together or to the VM."""


class ChunkCorrupt(UffdError):
    """A chunk of a memory file does not match its digest in the manifest."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self.path = path
        self.offset = offset
        self.length = length
        super().__init__(
            f"memory file {path!r} is corrupt: the chunk at offset {offset:#x} "
            f"({length} bytes) does not match its digest; refusing to serve it"
        )
