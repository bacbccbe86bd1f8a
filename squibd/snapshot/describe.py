"""Describe a state file (and its memory file) for humans and scripts.

:func:`describe_snapshot` never raises for a damaged file: it applies the load
order of SPEC section 3, records each failure as an :class:`ErrorReport`, and
goes on with what it can still read (a CRC mismatch does not stop it from
decoding the body; it says the fields come from a damaged file). It also
recognises a Firecracker bincode-era file: same header (magic + version),
but a body that is not squibd's MessagePack map.
"""

from __future__ import annotations

import errno
import importlib
import os
import struct
from collections.abc import Sequence
from typing import Any, Final

import attrs
import msgpack

from .codec import decode_body
from .compat import MIB, check_compatible
from .envelope import (
    ARCH_BY_MAGIC,
    CRC_SIZE,
    HEADER_FIXED_SIZE,
    STATE_VERSION,
    crc64,
    host_magic,
    read_header,
    read_state_bytes,
    version_compatible,
)
from .errors import Bitcode, CrcMismatch, MemoryIo, SnapshotError, TooShort, VersionMismatch
from .manifest import KIND_DIFF, MemoryManifest, PageMapError
from .models import MicrovmState
from .pairing import PAIR_XATTR
from .paths import open_client_file

__all__ = [
    "FORMAT_FIRECRACKER",
    "FORMAT_SQUIBD",
    "FORMAT_UNKNOWN",
    "Description",
    "ErrorReport",
    "ManifestSummary",
    "MemoryFileReport",
    "default_memory_path",
    "describe_snapshot",
    "render_text",
]

FORMAT_SQUIBD: Final = "squibd"
FORMAT_FIRECRACKER: Final = "firecracker-bincode"
FORMAT_UNKNOWN: Final = "unknown"
#: A version string longer than this is not read for display.
_MAX_SHOWN_VERSION: Final = 64
_SNAP_SUFFIX: Final = ".snap"
_MEM_SUFFIX: Final = ".mem"


@attrs.frozen
class ErrorReport:
    """One failure found while describing: the error kind and its wire message."""

    kind: str
    message: str
    detail: str | None = None

    @classmethod
    def of(cls, error: SnapshotError) -> ErrorReport:
        detail = getattr(error, "detail", None)
        return cls(error.kind, error.wire_message(), detail if isinstance(detail, str) else None)


@attrs.frozen
class ManifestSummary:
    """What the manifest says about the memory file."""

    kind: str
    file_size: int
    page_size: int
    regions: int
    #: None when a page map does not decode (an error says so).
    extents: int | None
    bytes_written: int | None
    pair_id: str
    parent_pair_id: str | None
    digest_algorithm: str

    @classmethod
    def of(cls, manifest: MemoryManifest) -> ManifestSummary:
        try:
            extents: int | None = len(manifest.extents)
            written: int | None = manifest.bytes_written
        except PageMapError:
            extents = written = None
        return cls(
            kind=manifest.kind, file_size=manifest.file_size, page_size=manifest.page_size,
            regions=len(manifest.regions), extents=extents,
            bytes_written=written, pair_id=manifest.pair_id,
            parent_pair_id=manifest.parent_pair_id, digest_algorithm=manifest.digest_algorithm,
        )  # fmt: skip


@attrs.frozen
class MemoryFileReport:
    """Whether the memory file exists and matches the manifest (size, pair xattr)."""

    path: str
    exists: bool
    size: int | None = None
    size_ok: bool | None = None
    #: The ``user.squibd.pair`` xattr; None when absent or unsupported.
    pair_xattr: str | None = None
    pair_ok: bool | None = None

    @property
    def matches(self) -> bool:
        return self.exists and bool(self.size_ok) and self.pair_ok is not False


@attrs.frozen
class Description:
    """Everything ``squibd --describe-snapshot`` shows."""

    path: str
    file_size: int | None = None
    magic: int | None = None
    arch: str | None = None
    version: str | None = None
    expected_version: str = STATE_VERSION
    format: str = FORMAT_UNKNOWN
    crc_ok: bool | None = None
    vcpu_count: int | None = None
    mem_size_mib: int | None = None
    track_dirty_pages: bool | None = None
    devices: tuple[tuple[str, str, int], ...] = ()
    mmds_present: bool | None = None
    manifest: ManifestSummary | None = None
    memory_file: MemoryFileReport | None = None
    verify_mode: str = "none"
    errors: tuple[ErrorReport, ...] = ()
    notes: tuple[str, ...] = ()
    #: The state file's optional metadata (``snapshot.create`` stores it).
    created_at: str | None = None
    vm_id: str | None = None
    host: str | None = None
    labels: dict[str, str] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (the CLI exits 0, else 2)."""
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (magic as a hex string, memory-file match spelled out)."""
        data: dict[str, Any] = attrs.asdict(self, recurse=True)
        data["magic"] = None if self.magic is None else hex(self.magic)
        data["devices"] = [dict(zip(("kind", "id", "mmio_slot"), d, strict=True))
                           for d in self.devices]  # fmt: skip
        if self.memory_file is not None:
            data["memory_file"]["matches"] = self.memory_file.matches
        data["ok"] = self.ok
        return data


def default_memory_path(snapshot_path: str) -> str:
    """``<id>.snap`` -> ``<id>.mem`` (SPEC section 1); other names get ``.mem`` appended."""
    stem = snapshot_path[: -len(_SNAP_SUFFIX)] if snapshot_path.endswith(_SNAP_SUFFIX) else None
    return (stem if stem is not None else snapshot_path) + _MEM_SUFFIX


def _memory_report(
    path: str, manifest: MemoryManifest, allowed_roots: Sequence[str] | None = None
) -> MemoryFileReport:
    try:  # never follows a final symlink nor opens a FIFO (raises InvalidPath)
        fd = open_client_file(path, "mem_file_path", allowed_roots)
    except FileNotFoundError:
        return MemoryFileReport(path=path, exists=False)
    except OSError as error:
        raise MemoryIo(error) from error
    try:
        size = os.fstat(fd).st_size
        try:
            pair: str | None = os.getxattr(fd, PAIR_XATTR).decode("utf-8", "replace")
        except OSError:
            pair = None  # absent, or a filesystem without user xattrs
    finally:
        os.close(fd)
    return MemoryFileReport(
        path=path, exists=True, size=size, size_ok=size == manifest.file_size,
        pair_xattr=pair, pair_ok=None if pair is None else pair == manifest.pair_id,
    )  # fmt: skip


def _is_squibd_body(body: bytes) -> bool:
    try:
        return isinstance(msgpack.unpackb(body, raw=False, strict_map_key=False), dict)
    except Exception:  # damaged or foreign input raises many types
        return False


def _run_verify(state: MicrovmState, memory_path: str, mode: str) -> ErrorReport | None:
    try:  # lazy: owned by the memory-files part (the package re-exports a function ``verify``)
        verify_module = importlib.import_module(f"{__package__}.verify")
    except ImportError:
        return ErrorReport("MemoryIo", str(MemoryIo(errno.ENOSYS)),
                           "squibd.snapshot.verify is not available")  # fmt: skip
    try:
        verify_module.verify(state, memory_path, mode)
    except SnapshotError as error:
        return ErrorReport.of(error)
    return None


def describe_snapshot(
    path: str,
    *,
    memory_file: str | None = None,
    verify: str = "none",
    allowed_roots: Sequence[str] | None = None,
) -> Description:
    """Describe the state file at ``path`` and its memory file.

    Args:
        path: the state file.
        memory_file: the memory file (default: :func:`default_memory_path`).
        verify: ``none``, ``size`` or ``full``; checked by
            ``squibd.snapshot.verify.verify`` when not ``none``.
        allowed_roots: if given, both files must really lie inside one of them.
    """
    errors: list[ErrorReport] = []
    notes: list[str] = []
    fields: dict[str, Any] = {"path": path, "verify_mode": verify}

    def done() -> Description:
        return Description(**fields, errors=tuple(errors), notes=tuple(notes))

    try:
        data = read_state_bytes(path, allowed_roots=allowed_roots)
    except SnapshotError as error:
        errors.append(ErrorReport.of(error))
        return done()
    fields["file_size"] = len(data)
    if len(data) < CRC_SIZE:
        errors.append(ErrorReport.of(TooShort()))
        return done()
    body_end = len(data) - CRC_SIZE
    fields["crc_ok"] = crc64(data[:body_end]) == struct.unpack_from("<Q", data, body_end)[0]
    if not fields["crc_ok"]:
        errors.append(ErrorReport.of(CrcMismatch()))
        notes.append("CRC mismatch: the fields below come from a damaged file")
    if body_end >= HEADER_FIXED_SIZE:
        fields["magic"] = struct.unpack_from("<Q", data, 0)[0]
    try:  # the header parser load uses: a header describe accepts, load accepts
        magic, version, body_offset = read_header(data, body_end)
    except SnapshotError as error:
        errors.append(ErrorReport.of(error))
        if isinstance(error, Bitcode):
            notes.append("the header cannot be read: " + str(error))
        return done()
    fields["arch"], cls = ARCH_BY_MAGIC[magic]
    fields["version"] = version
    if not version_compatible(version):
        errors.append(ErrorReport.of(VersionMismatch(version, STATE_VERSION)))
    body = data[body_offset:body_end]
    if not _is_squibd_body(body):
        fields["format"] = FORMAT_FIRECRACKER
        notes.append(
            "the body is not squibd's MessagePack state: this looks like a Firecracker "
            "bincode-era snapshot (same header); only magic and version can be shown"
        )
        if not errors:
            errors.append(ErrorReport("Bitcode", "snapshot encoding error: body is not squibd's"))
        return done()
    fields["format"] = FORMAT_SQUIBD
    try:
        state: MicrovmState = decode_body(body, cls)
    except SnapshotError as error:
        errors.append(ErrorReport.of(error))
        return done()
    _fill_from_state(fields, state)
    if state.memory.kind == KIND_DIFF:
        notes.append("a Diff loads only after a rebase onto its Full parent "
                     "(squibd --rebase-snapshot)")  # fmt: skip
    if magic != host_magic():
        notes.append(f"this is an {fields['arch']} snapshot: this host cannot load it")
    try:
        check_compatible(state)
    except SnapshotError as error:
        errors.append(ErrorReport.of(error))
    memory_path = memory_file or default_memory_path(path)
    try:
        report = _memory_report(memory_path, state.memory, allowed_roots)
    except SnapshotError as error:
        errors.append(ErrorReport.of(error))
        return done()
    fields["memory_file"] = report
    if report.exists and not report.matches:
        errors.append(ErrorReport("MemoryIo", str(MemoryIo(errno.EINVAL)),
                                  "the memory file does not match the manifest"))  # fmt: skip
    elif not report.exists and (memory_file is not None or verify != "none"):
        errors.append(ErrorReport.of(MemoryIo(errno.ENOENT)))
    elif report.exists and (verify != "none" or not errors):
        # At least the binding check load makes: size and pair xattr, and a full
        # digest check of a memory file without the xattr (verify.check_pair_binding).
        failure = _run_verify(state, memory_path, "size" if verify == "none" else verify)
        if failure is not None:
            errors.append(failure)
    return done()


def _fill_from_state(fields: dict[str, Any], state: MicrovmState) -> None:
    info = state.vm_info
    fields.update(
        vcpu_count=len(state.vcpu_states), mem_size_mib=info.mem_size_mib,
        track_dirty_pages=info.track_dirty_pages, mmds_present=state.mmds_state is not None,
        devices=tuple((d.kind, d.id, d.mmio_slot) for d in state.device_states),
        manifest=ManifestSummary.of(state.memory),
    )  # fmt: skip
    meta = getattr(state, "metadata", None)
    if meta is not None:
        fields.update(
            created_at=meta.created_at, vm_id=meta.vm_id, host=meta.host, labels=dict(meta.labels)
        )


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def render_text(desc: Description) -> str:
    """The human-readable form of a description."""
    magic = "unreadable" if desc.magic is None else hex(desc.magic)
    lines = [
        f"snapshot:          {desc.path}",
        f"file size:         {desc.file_size if desc.file_size is not None else 'unreadable'}",
        f"format:            {desc.format}",
        f"magic:             {magic} ({desc.arch or 'unknown architecture'})",
        f"version:           {desc.version or 'unreadable'} (squibd reads {desc.expected_version})",
        f"crc_ok:            {_yes_no(desc.crc_ok)}",
    ]
    if desc.vcpu_count is not None:
        size = f"{desc.mem_size_mib} MiB" if desc.mem_size_mib is not None else "?"
        lines += [
            f"vCPUs:             {desc.vcpu_count}",
            f"memory size:       {size}",
            f"dirty tracking:    {_yes_no(desc.track_dirty_pages)}",
            f"MMDS:              {'present' if desc.mmds_present else 'absent'}",
            f"devices:           {len(desc.devices)}",
            *(f"  - slot {slot}: {kind} {ident!r}" for kind, ident, slot in desc.devices),
        ]
    if desc.created_at is not None or desc.vm_id is not None or desc.labels:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(desc.labels.items())) or "-"
        lines += [
            f"created:           {desc.created_at or '?'} on {desc.host or '?'}"
            f" from VM {desc.vm_id or '?'}",
            f"labels:            {labels}",
        ]
    if desc.manifest is not None:
        m = desc.manifest
        lines += [
            f"manifest:          {m.kind}, {m.file_size} bytes ({m.file_size / MIB:.1f} MiB),"
            f" page {m.page_size}, {m.regions} region(s)",
            f"  extents:         {m.extents} ({m.bytes_written} bytes written)",
            f"  pair id:         {m.pair_id}",
            f"  parent pair id:  {m.parent_pair_id or '-'}",
            f"  digests:         {m.digest_algorithm}",
        ]
    if desc.memory_file is not None:
        mf = desc.memory_file
        status = "missing" if not mf.exists else ("matches" if mf.matches else "DOES NOT MATCH")
        detail = "" if not mf.exists else (
            f" (size {mf.size}, size_ok {_yes_no(mf.size_ok)}, pair xattr "
            f"{mf.pair_xattr or 'absent'}, pair_ok {_yes_no(mf.pair_ok)})"
        )  # fmt: skip
        lines.append(f"memory file:       {mf.path}: {status}{detail}")
    if desc.verify_mode != "none":
        verified = not any(e.kind == "MemoryIo" for e in desc.errors)
        lines.append(f"verify ({desc.verify_mode}):     {'ok' if verified else 'FAILED'}")
    lines += [f"note: {note}" for note in desc.notes]
    lines += [f"error: [{e.kind}] {e.message}" + (f" ({e.detail})" if e.detail else "")
              for e in desc.errors]  # fmt: skip
    status = "ok" if desc.ok else "NOT LOADABLE (see the errors above)"
    lines.append(f"status:            {status}")
    return "\n".join(lines)
