"""The snapshot format and storage: synchronous, thread-safe, no trio.

Public names are re-exported here as the modules land.
"""

from .errors import (
    TEMPLATES,
    AtomicCommitCrossFs,
    AtomicCommitFailed,
    Bitcode,
    Capture,
    CrcMismatch,
    Incompatible,
    InvalidPath,
    Io,
    MagicMismatch,
    MemoryIo,
    QuiesceTimeout,
    SizeLimitExceeded,
    SnapshotError,
    TooShort,
    VersionMismatch,
)

__all__ = [
    "TEMPLATES",
    "AtomicCommitCrossFs",
    "AtomicCommitFailed",
    "Bitcode",
    "Capture",
    "CrcMismatch",
    "Incompatible",
    "InvalidPath",
    "Io",
    "MagicMismatch",
    "MemoryIo",
    "QuiesceTimeout",
    "SizeLimitExceeded",
    "SnapshotError",
    "TooShort",
    "VersionMismatch",
]
