"""The state-file envelope: header, body, CRC-64 trailer (SPEC section 3).

Layout::

    offset 0   magic        u64 LE (architecture)
    offset 8   version_len  u64 LE
    offset 16  version      ASCII "major.minor.patch"
    ...        body         MessagePack (codec.py)
    end-8      crc          u64 LE, CRC-64/Jones of every byte before it

Load order (SPEC section 3): size limit -> TooShort -> CRC -> magic ->
version -> body decode -> compatibility check. :func:`decode_state` applies
all of it; :func:`parse_envelope` stops after the header and can skip the CRC
so that ``describe`` can show what it can of a damaged file.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import struct
from collections.abc import Sequence
from typing import Final

import attrs
import crcmod

from .codec import decode_body, encode_body
from .compat import check_compatible
from .digest import UnknownDigestAlgorithm, digest_function
from .errors import (
    Bitcode,
    CrcMismatch,
    Io,
    MagicMismatch,
    SizeLimitExceeded,
    TooShort,
    VersionMismatch,
)
from .journal import recover_snapshot
from .manifest import PAGE_MAP_MIN_EXTENTS, compact_manifest
from .models import Aarch64MicrovmState, MicrovmState, X86MicrovmState
from .paths import open_client_file, validate_path

__all__ = [
    "ARCH_BY_MAGIC",
    "CRC64_IS_C_EXTENSION",
    "CRC_SIZE",
    "HEADER_FIXED_SIZE",
    "MAGIC_AARCH64",
    "MAGIC_X86_64",
    "STATE_SIZE_LIMIT",
    "STATE_VERSION",
    "Envelope",
    "crc64",
    "decode_state",
    "encode_state",
    "host_magic",
    "parse_envelope",
    "read_header",
    "read_state_bytes",
    "read_state_file",
    "version_compatible",
]

_log = logging.getLogger(__name__)

#: SPEC section 3: magic numbers per architecture (Firecracker's values).
MAGIC_X86_64: Final = 0x0710_1984_8664_0000
MAGIC_AARCH64: Final = 0x0710_1984_AAAA_0000
#: magic -> (architecture name, state class).
ARCH_BY_MAGIC: Final[dict[int, tuple[str, type[X86MicrovmState] | type[Aarch64MicrovmState]]]] = {
    MAGIC_X86_64: ("x86_64", X86MicrovmState),
    MAGIC_AARCH64: ("aarch64", Aarch64MicrovmState),
}
_MAGIC_BY_CLASS: Final[dict[type, int]] = {
    X86MicrovmState: MAGIC_X86_64,
    Aarch64MicrovmState: MAGIC_AARCH64,
}
#: SPEC section 3: squibd's state format version (semver; see version_compatible).
#: 1.1.0 added the optional ``memory.page_map`` (manifest.py); 1.0.0 files still load.
STATE_VERSION: Final = "1.1.0"
#: SPEC section 3: files larger than this are refused before they are read.
STATE_SIZE_LIMIT: Final = 10_000_000
#: The CRC trailer is one u64 (SPEC section 3).
CRC_SIZE: Final = 8
#: magic (u64) + version_len (u64).
HEADER_FIXED_SIZE: Final = 16
#: A version string longer than this is not a semver a squibd ever wrote.
_MAX_VERSION_LEN: Final = 64
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<QQ")
_SEMVER = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")

# SPEC section 3: CRC-64/Jones (the Redis variant): poly 0xad93d23594c935a9,
# reflected, init 0, xorout 0. crcmod wants the polynomial with its x^64 bit.
_CRC64_JONES_POLY: Final = 0x1_AD93_D235_94C9_35A9
crc64 = crcmod.mkCrcFun(_CRC64_JONES_POLY, initCrc=0, rev=True, xorOut=0)
"""CRC-64/Jones of a bytes-like object (check value of ``b"123456789"``: 0xe9c6d914c4b8d9ca)."""

#: True when crcmod's C extension computes the CRC (hundreds of MB/s);
#: the pure-Python fallback is about a thousand times slower.
CRC64_IS_C_EXTENSION: Final[bool] = importlib.util.find_spec("crcmod._crcfunext") is not None
if not CRC64_IS_C_EXTENSION:
    _log.warning(
        "crcmod's C extension is not available: CRC-64 of state files uses the slow "
        "pure-Python fallback; reinstall crcmod with a C compiler present to fix this"
    )


@attrs.frozen
class Envelope:
    """A parsed header and the location of the body, before decoding."""

    magic: int
    version: str
    #: None when the CRC was not checked.
    crc_ok: bool | None
    body_offset: int
    body_end: int

    @property
    def arch(self) -> str | None:
        """``x86_64``, ``aarch64`` or None for an unknown magic."""
        entry = ARCH_BY_MAGIC.get(self.magic)
        return entry[0] if entry else None


def host_magic() -> int:
    """The magic of the machine squibd runs on (x86_64 unless on arm64)."""
    return MAGIC_AARCH64 if os.uname().machine in ("aarch64", "arm64") else MAGIC_X86_64


def version_compatible(found: str, ours: str = STATE_VERSION) -> bool:
    """SPEC section 3: same major, minor not greater than ours, any patch."""
    match, mine = _SEMVER.fullmatch(found), _SEMVER.fullmatch(ours)
    if match is None or mine is None:
        return False
    major, minor, _ = (int(part) for part in match.groups())
    our_major, our_minor, _ = (int(part) for part in mine.groups())
    return major == our_major and minor <= our_minor


def encode_state(state: MicrovmState) -> bytes:
    """Build a complete state file: header, MessagePack body, CRC-64 trailer.

    The state is checked for compatibility first, so squibd never writes a
    file it would refuse to load.

    Raises:
        Incompatible: the state breaks a rule of the compatibility check.
        Bitcode: a value cannot be encoded.
        SizeLimitExceeded: the file would exceed ``STATE_SIZE_LIMIT``.
    """
    magic = _MAGIC_BY_CLASS.get(type(state))
    if magic is None:
        raise Bitcode(f"cannot encode {type(state).__name__}: not a MicrovmState")
    check_compatible(state)
    state = _compact(state)
    version = STATE_VERSION.encode("ascii")
    head = _HEADER.pack(magic, len(version)) + version
    data = b"".join((head, encode_body(state)))
    if len(data) + CRC_SIZE > STATE_SIZE_LIMIT:
        raise SizeLimitExceeded(STATE_SIZE_LIMIT)
    return data + _U64.pack(crc64(data))


def _compact(state: MicrovmState) -> MicrovmState:
    """Store a manifest of many extents as a page map (manifest.py), when it is faithful."""
    manifest = state.memory
    if manifest.page_map is not None or len(manifest.stored_extents) <= PAGE_MAP_MIN_EXTENTS:
        return state
    try:
        combine = digest_function(manifest.digest_algorithm)
    except UnknownDigestAlgorithm:
        return state
    compact = compact_manifest(manifest, combine)
    return state if compact is None else attrs.evolve(state, memory=compact)


def read_header(data: bytes | memoryview, body_end: int) -> tuple[int, str, int]:
    """Magic, version string and body offset of a state file whose body ends at ``body_end``.

    The one header parser of load and describe (the version is not yet
    compared with ours: :func:`version_compatible`).

    Raises:
        Bitcode: the header ends early, the version length does not fit or
            the version is not ASCII.
        MagicMismatch: the magic is not an architecture squibd knows.
    """
    view = memoryview(data)
    if body_end < HEADER_FIXED_SIZE:
        raise Bitcode(f"file ends inside the {HEADER_FIXED_SIZE}-byte header")
    magic, version_len = _HEADER.unpack_from(view, 0)
    if magic not in ARCH_BY_MAGIC:
        raise MagicMismatch(magic, host_magic())
    if version_len > _MAX_VERSION_LEN or HEADER_FIXED_SIZE + version_len > body_end:
        raise Bitcode(f"version length {version_len} does not fit the header")
    raw_version = bytes(view[HEADER_FIXED_SIZE : HEADER_FIXED_SIZE + version_len])
    try:
        version = raw_version.decode("ascii")
    except UnicodeDecodeError as exc:
        raise Bitcode(f"version {raw_version!r} is not ASCII") from exc
    return magic, version, HEADER_FIXED_SIZE + version_len


def parse_envelope(data: bytes | memoryview, *, check_crc: bool = True) -> Envelope:
    """Apply the load order up to the body: size, TooShort, CRC, magic, version.

    Args:
        data: the whole file.
        check_crc: False skips the CRC (``describe`` of a damaged file); the
            returned ``crc_ok`` is then None.

    Raises:
        SizeLimitExceeded, TooShort, CrcMismatch, MagicMismatch,
        VersionMismatch, Bitcode (a header that ends early or is not ASCII).
    """
    view = memoryview(data)
    if len(view) > STATE_SIZE_LIMIT:
        raise SizeLimitExceeded(STATE_SIZE_LIMIT)
    if len(view) < CRC_SIZE:
        raise TooShort()
    body_end = len(view) - CRC_SIZE
    crc_ok: bool | None = None
    if check_crc:
        (stored,) = _U64.unpack_from(view, body_end)
        if crc64(view[:body_end]) != stored:
            raise CrcMismatch()
        crc_ok = True
    magic, version, body_offset = read_header(view, body_end)
    if not version_compatible(version):
        raise VersionMismatch(version, STATE_VERSION)
    return Envelope(
        magic=magic,
        version=version,
        crc_ok=crc_ok,
        body_offset=body_offset,
        body_end=body_end,
    )


def decode_state(data: bytes | memoryview, *, check_crc: bool = True) -> MicrovmState:
    """Load a state file's bytes with the full load order of SPEC section 3.

    This is the one validation of a state file: ``describe`` applies the same
    steps (and calls a file ok exactly when this returns).

    Raises:
        SizeLimitExceeded, TooShort, CrcMismatch, MagicMismatch,
        VersionMismatch, Bitcode, Incompatible.
    """
    envelope = parse_envelope(data, check_crc=check_crc)
    _, cls = ARCH_BY_MAGIC[envelope.magic]
    body = memoryview(data)[envelope.body_offset : envelope.body_end]
    state: MicrovmState = decode_body(body, cls)
    check_compatible(state)
    return state


def read_state_bytes(
    path: str | os.PathLike[str], *, allowed_roots: Sequence[str] | None = None
) -> bytes:
    """Read a state file, refusing it before reading more than limit + 1 bytes.

    The file is opened with :func:`~squibd.snapshot.paths.open_client_file`:
    a final symlink, a directory, a FIFO, a socket or a device is refused.

    Raises:
        InvalidPath: not a regular file, or outside ``allowed_roots``.
        SizeLimitExceeded: the file is larger than ``STATE_SIZE_LIMIT``.
        Io: the file cannot be opened or read.
    """
    try:
        fd = open_client_file(os.fspath(path), "snapshot_path", allowed_roots)
    except OSError as exc:
        raise Io(exc) from exc
    try:
        # fstat catches a regular file early; the bounded read also catches
        # files whose size fstat cannot tell (pipes, /proc).
        if os.fstat(fd).st_size > STATE_SIZE_LIMIT:
            raise SizeLimitExceeded(STATE_SIZE_LIMIT)
        chunks: list[bytes] = []
        remaining = STATE_SIZE_LIMIT + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as exc:
        raise Io(exc) from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > STATE_SIZE_LIMIT:
        raise SizeLimitExceeded(STATE_SIZE_LIMIT)
    return data


def read_state_file(
    path: str | os.PathLike[str],
    *,
    recover: bool = True,
    allowed_roots: Sequence[str] | None = None,
) -> MicrovmState:
    """Read and fully load a state file (size limit first, then :func:`decode_state`).

    Args:
        path: the state file.
        recover: first finish or undo an interrupted save of this path
            (SPEC section 5: recovery runs at the next load of a path).
        allowed_roots: if given, the file must really lie inside one of them.

    Raises:
        InvalidPath, Io, SizeLimitExceeded, and every error of :func:`decode_state`.
    """
    if recover:
        validate_path(os.fspath(path))  # no recovery on behalf of a reserved name
        recover_snapshot(os.fspath(path))
    return decode_state(read_state_bytes(path, allowed_roots=allowed_roots))
