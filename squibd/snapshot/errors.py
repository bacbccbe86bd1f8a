"""The snapshot error kinds of SPEC section 2.

Every snapshot failure is one of fourteen kinds. Each kind is a class named
by its cause; ``kind`` is the wire name and ``str(error)`` (equal to
``error.wire_message()``) is the byte-exact message of the contract, which
scripts match on. Placeholders are formatted as SPEC section 2 fixes them:

- magic numbers as lowercase hex with ``0x`` and no padding;
- OS errors as ``<strerror> (os error <errno>)``;
- paths in double quotes with ``"`` and ``\\`` escaped and control
  characters written as ``\\n``, ``\\t`` or ``\\u{1b}``.
"""

from __future__ import annotations

import errno as _errno
import os
from typing import ClassVar

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
    "format_os_error",
    "quote_path",
]


def format_os_error(error: OSError | int) -> str:
    """Render an OS error as ``<strerror text> (os error <errno>)``.

    Args:
        error: an ``OSError`` (its ``errno`` is used) or a bare errno value.
    """
    code = error if isinstance(error, int) else error.errno
    if code is None:
        # An OSError raised without an errno (rare: some library errors).
        # EIO is the closest honest description of "the I/O failed".
        return f"{error} (os error {_errno.EIO})"
    return f"{os.strerror(code)} (os error {code})"


_SIMPLE_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"}


def quote_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """Quote a path the way SPEC section 2 prints ``{dest}`` and ``{temp_dir}``.

    Bytes that are not UTF-8 (``surrogateescape`` in a ``str``, or raw
    ``bytes``) are written as ``\\xNN``.
    """
    raw = os.fspath(path)
    text = raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[ch])
        elif 0xDC80 <= code <= 0xDCFF:  # a byte that was not valid UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\u{{{code:x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


class SnapshotError(Exception):
    """Base of every snapshot failure; ``kind`` is the wire-stable name."""

    kind: ClassVar[str] = "Snapshot"
    template: ClassVar[str] = ""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self._message = message

    def __str__(self) -> str:
        return self._message

    def wire_message(self) -> str:
        """The message of the contract (SPEC section 2); equal to ``str()``."""
        return self._message


class _FixedMessage(SnapshotError):
    def __init__(self, detail: str | None = None) -> None:
        super().__init__(self.template)
        #: Extra context for logs; never part of the wire message.
        self.detail = detail


class QuiesceTimeout(_FixedMessage):
    """A vCPU did not acknowledge the pause request before the quiesce scope expired."""

    kind = "QuiesceTimeout"
    template = "a vCPU did not ack quiesce within the timeout"


class MagicMismatch(SnapshotError):
    """The state file's magic is not the one this architecture expects."""

    kind = "MagicMismatch"
    template = "snapshot magic mismatch (file: {found}, expected: {expected})"

    def __init__(self, found: int, expected: int) -> None:
        self.found = found
        self.expected = expected
        super().__init__(self.template.format(found=hex(found), expected=hex(expected)))


class VersionMismatch(SnapshotError):
    """The state file's format version cannot be loaded by this squibd."""

    kind = "VersionMismatch"
    template = "snapshot version {found} is incompatible with squib's {expected}"

    def __init__(self, found: str, expected: str) -> None:
        self.found = found
        self.expected = expected
        super().__init__(self.template.format(found=found, expected=expected))


class CrcMismatch(_FixedMessage):
    """The CRC-64 trailer does not match the bytes before it."""

    kind = "CrcMismatch"
    template = "snapshot CRC64 mismatch"


class TooShort(_FixedMessage):
    """The state file is shorter than its 8-byte CRC trailer."""

    kind = "TooShort"
    template = "snapshot file is too short to contain a CRC trailer"


class Incompatible(_FixedMessage):
    """The state describes a machine this VMM cannot run (``detail`` says why)."""

    kind = "Incompatible"
    template = "snapshot is from a different VMM (sysreg or GIC blob shape mismatch)"


class _IoKind(SnapshotError):
    def __init__(self, error: OSError | int) -> None:
        self.errno = error if isinstance(error, int) else error.errno
        super().__init__(self.template.format(io=format_os_error(error)))


class AtomicCommitFailed(_IoKind):
    """The rename that commits a snapshot pair failed."""

    kind = "AtomicCommitFailed"
    template = "atomic commit (rename) failed: {io}"


class AtomicCommitCrossFs(SnapshotError):
    """The staging directory is on another filesystem than the destination."""

    kind = "AtomicCommitCrossFs"
    template = (
        "snapshot temp-file path is on a different filesystem from the destination "
        "(dest={dest}, temp_dir={temp_dir}); rename(2) cannot be atomic across mounts"
    )

    def __init__(
        self, dest: str | os.PathLike[str], temp_dir: str | os.PathLike[str]
    ) -> None:
        super().__init__(
            self.template.format(dest=quote_path(dest), temp_dir=quote_path(temp_dir))
        )


class _ReasonKind(SnapshotError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(self.template.format(reason=reason))


class InvalidPath(_ReasonKind):
    """A path given by a client breaks a rule of SPEC section 10."""

    kind = "InvalidPath"
    template = "invalid snapshot path: {reason}"


class Bitcode(_ReasonKind):
    """The state body could not be encoded or decoded (``reason`` names the field)."""

    kind = "Bitcode"
    template = "snapshot encoding error: {reason}"


class SizeLimitExceeded(SnapshotError):
    """The state file is larger than the deserialization limit."""

    kind = "SizeLimitExceeded"
    template = "snapshot exceeds {limit} byte deserialization limit"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(self.template.format(limit=limit))


class MemoryIo(_IoKind):
    """Reading or writing the memory file failed."""

    kind = "MemoryIo"
    template = "memory file I/O error: {io}"


class Io(_IoKind):
    """Reading or writing the state file (or its directory) failed."""

    kind = "Io"
    template = "snapshot I/O error: {io}"


class Capture(_ReasonKind):
    """Capturing or restoring vCPU, VM or device state failed."""

    kind = "Capture"
    template = "snapshot capture/restore failure: {reason}"


#: kind -> message template, the content of ``protocol/errors.json``.
TEMPLATES: dict[str, str] = {
    cls.kind: cls.template
    for cls in (
        QuiesceTimeout,
        MagicMismatch,
        VersionMismatch,
        CrcMismatch,
        TooShort,
        Incompatible,
        AtomicCommitFailed,
        AtomicCommitCrossFs,
        InvalidPath,
        Bitcode,
        SizeLimitExceeded,
        MemoryIo,
        Io,
        Capture,
    )
}
