"""Lazy restore through userfaultfd (SPEC section 8, issue 7).

- ``UffdBackend``: the VMM side. Registers empty guest memory with a
  userfaultfd and hands it to a page server (Firecracker's handshake).
- ``PageServer`` / ``MemorySource``: the page-server side. Serves faults from a
  Full memory file and its Diffs, digest-checked (``PageSource``), or from a
  Firecracker-made raw memory file (``RawMemorySource``), with prefetch and
  background streaming; ``ServeLoop`` serves several VMMs at once.
  ``squibd --page-server`` runs it as a process.
"""

from .backend import DEFAULT_HANDSHAKE_TIMEOUT_S, DEFAULT_READY_TIMEOUT_S, UffdBackend
from .errors import (
    ChunkCorrupt,
    HandshakeFailed,
    HandshakeInvalid,
    PageServerUnavailable,
    SnapshotMismatch,
    UffdError,
    UffdUnsupported,
)
from .handshake import RegionMapping, decode_regions, encode_regions
from .listener import ServeLoop
from .prefetch import prefetch_offsets
from .server import STREAM_CHUNK, PageServer, ServeStats
from .source import MemorySource, PageSource, RawMemorySource
from .userfaultfd import Userfaultfd

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT_S",
    "DEFAULT_READY_TIMEOUT_S",
    "STREAM_CHUNK",
    "ChunkCorrupt",
    "HandshakeFailed",
    "HandshakeInvalid",
    "MemorySource",
    "PageServer",
    "PageServerUnavailable",
    "PageSource",
    "RawMemorySource",
    "RegionMapping",
    "ServeLoop",
    "ServeStats",
    "SnapshotMismatch",
    "UffdBackend",
    "UffdError",
    "UffdUnsupported",
    "Userfaultfd",
    "decode_regions",
    "encode_regions",
    "prefetch_offsets",
]
