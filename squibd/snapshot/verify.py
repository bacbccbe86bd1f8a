"""Checking a memory file against its manifest (SPEC section 4).

``verify(state, memory_path, mode)``:

- ``none``: nothing is checked;
- ``size``: the pair binding (:func:`check_pair_binding`): the file's size
  equals the manifest's and its ``user.squibd.pair`` xattr names the
  manifest's pair; a file WITHOUT the xattr (a plain ``cp`` drops it) is
  verified in full instead, so that another pair's memory file is never
  taken for this one;
- ``full``: ``size``, then every written chunk is read and hashed; the first
  chunk whose digest differs is named by its file offset.

:func:`check_pair_binding` is the one pair check of load (File backend),
rebase inputs and page-server sources.

Failures are ``MemoryIo`` kinds: ``MemoryPairMismatch`` (another pair or the
wrong size), ``MemoryDigestMismatch`` (corrupt data, ``offset`` set),
``MemoryInputInvalid`` (an inconsistent manifest), plain ``MemoryIo`` for
OS errors. The module also offers two comparisons tests and tools use:
:func:`data_extents` (where a file holds data, by ``SEEK_DATA``) and
:func:`first_difference` (content only; holes read as zeros).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Final, Protocol

from .compat import check_page_map
from .digest import digest_function, read_pieces, unit_digest
from .errors import Incompatible, MemoryIo
from .manifest import DIGEST_SIZES, Extent, MemoryManifest, iter_chunks, iter_digest_units
from .memerrors import MemoryDigestMismatch, MemoryInputInvalid, MemoryPairMismatch
from .memplan import memfd_extents
from .pairing import PAIR_XATTR, read_pair_xattr
from .paths import open_client_file

__all__ = [
    "VERIFY_MODES",
    "check_manifest",
    "check_pair_binding",
    "data_extents",
    "first_difference",
    "verify",
    "verify_fd",
]

#: The modes of ``squibd --describe-snapshot --verify``.
VERIFY_MODES: Final = ("none", "size", "full")
#: Read size when comparing files (a multiple of every page size in use).
_COMPARE_BLOCK: Final = 4 * 1024 * 1024


class _HasManifest(Protocol):
    @property
    def memory(self) -> MemoryManifest: ...


def _manifest_of(state: _HasManifest | MemoryManifest) -> MemoryManifest:
    return state if isinstance(state, MemoryManifest) else state.memory


def check_manifest(manifest: MemoryManifest) -> None:
    """Check a manifest's internal consistency (extents, digest count, regions).

    Raises:
        MemoryInputInvalid: naming the first inconsistency.
    """
    if manifest.digest_algorithm not in DIGEST_SIZES:
        raise MemoryInputInvalid(f"unknown digest algorithm {manifest.digest_algorithm!r}")
    if manifest.chunk_size <= 0:
        raise MemoryInputInvalid(f"chunk size {manifest.chunk_size} is not positive")
    if sum(region.size for region in manifest.regions) != manifest.file_size:
        raise MemoryInputInvalid(
            f"regions add up to {sum(r.size for r in manifest.regions)} bytes, "
            f"the manifest's file size is {manifest.file_size}"
        )
    if manifest.page_map is not None:
        try:
            check_page_map(manifest)
        except Incompatible as error:
            raise MemoryInputInvalid(error.detail or str(error)) from error
        return
    previous_end = 0
    for extent in manifest.extents:
        if extent.length <= 0 or extent.offset < previous_end or extent.end > manifest.file_size:
            raise MemoryInputInvalid(
                f"extent [{extent.offset}, {extent.end}) is empty, unordered or outside the "
                f"{manifest.file_size}-byte file"
            )
        previous_end = extent.end
    chunks = sum(1 for _ in iter_chunks(manifest.extents, manifest.chunk_size))
    expected = chunks * manifest.digest_size
    if len(manifest.digests) != expected:
        raise MemoryInputInvalid(
            f"{len(manifest.digests)} digest bytes for {chunks} chunks "
            f"({expected} expected with {manifest.digest_algorithm})"
        )


def check_pair_binding(fd: int, manifest: MemoryManifest, *, path: str | None = None) -> bool:
    """Check that the open memory file ``fd`` is the one ``manifest`` describes.

    The file's size must equal the manifest's. With a ``user.squibd.pair``
    xattr, it must name the manifest's pair. Without one (a plain ``cp``, a
    filesystem without user xattrs), every written chunk is read and checked
    against the manifest's digests before this returns, so the memory file of
    another pair is refused before any vCPU runs.

    Args:
        fd: the memory file, open for reading.
        manifest: the manifest of the state file.
        path: named in error messages.

    Returns:
        True when the binding was proven by digests (no xattr), False by the xattr.

    Raises:
        MemoryPairMismatch: another pair's file, the wrong size, or (no xattr)
            content that does not match the digests.
        MemoryInputInvalid: the manifest is inconsistent.
        MemoryIo: an OS error.
    """
    if _bound_by_xattr(fd, manifest, path):
        return False
    try:
        _verify_digests(fd, manifest)
    except MemoryDigestMismatch as error:
        raise MemoryPairMismatch(
            f"{_name(path)} has no {PAIR_XATTR} xattr and does not match the digests of"
            f" pair {manifest.pair_id} (chunk at offset {error.offset}): another pair's"
            " memory file or a damaged copy"
        ) from error
    return True


def _name(path: str | None) -> str:
    return f"memory file {path!r}" if path else "memory file"


def _bound_by_xattr(fd: int, manifest: MemoryManifest, path: str | None) -> bool:
    """Size check, then the xattr: True when it names the pair, False when absent."""
    try:
        size = os.fstat(fd).st_size
    except OSError as error:
        raise MemoryIo(error) from error
    if size != manifest.file_size:
        raise MemoryPairMismatch(
            f"{_name(path)} is {size} bytes, the snapshot's manifest says {manifest.file_size}"
        )
    stored = read_pair_xattr(fd)
    if stored is None:
        return False
    if stored != manifest.pair_id:
        raise MemoryPairMismatch(
            f"{_name(path)} belongs to pair {stored}, the snapshot is pair {manifest.pair_id}"
        )
    return True


def verify_fd(fd: int, manifest: MemoryManifest, mode: str) -> None:
    """:func:`verify` on an open memory file."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"unknown verify mode {mode!r}; expected one of {VERIFY_MODES}")
    if mode == "none":
        return
    if mode == "size":
        check_pair_binding(fd, manifest)
        return
    _bound_by_xattr(fd, manifest, None)
    _verify_digests(fd, manifest)


def _verify_digests(fd: int, manifest: MemoryManifest) -> None:
    """Read and hash every written piece; raise at the first unit that differs."""
    check_manifest(manifest)
    hash_of = digest_function(manifest.digest_algorithm)
    buffer = memoryview(bytearray(manifest.chunk_size))
    try:
        for unit in iter_digest_units(manifest):
            pieces = read_pieces(fd, buffer, unit.pieces)  # one read: the pieces share a window
            if unit_digest(hash_of, pieces, unit.combined) != unit.digest:
                raise MemoryDigestMismatch(unit.offset, unit.end - unit.offset)
    finally:
        buffer.release()


def verify(
    state: _HasManifest | MemoryManifest,
    memory_path: str,
    mode: str,
    *,
    allowed_roots: Sequence[str] | None = None,
) -> None:
    """Check ``memory_path`` against the manifest of ``state`` (see the module doc).

    Args:
        state: a decoded state (anything with ``.memory``) or a manifest.
        memory_path: the memory file.
        mode: ``"none"``, ``"size"`` or ``"full"``.
        allowed_roots: if given, the memory file must really lie inside one.

    Raises:
        InvalidPath: not a regular file (symlink, FIFO, ...) or outside the roots.
        MemoryPairMismatch, MemoryDigestMismatch, MemoryInputInvalid, MemoryIo.
    """
    if mode == "none":
        return
    manifest = _manifest_of(state)
    try:
        fd = open_client_file(memory_path, "mem_file_path", allowed_roots)
    except OSError as error:
        raise MemoryIo(error) from error
    try:
        verify_fd(fd, manifest, mode)
    finally:
        os.close(fd)


def data_extents(path: str) -> list[Extent]:
    """Where ``path`` holds data according to ``SEEK_DATA``/``SEEK_HOLE``, coalesced."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return [Extent(start, length) for start, length in memfd_extents(fd, os.fstat(fd).st_size)]
    finally:
        os.close(fd)


def first_difference(path_a: str, path_b: str) -> int | None:
    """The first byte offset where two files' contents differ (holes read as zeros).

    Files of different sizes differ at the shorter size at the latest. None if equal.
    """
    with open(path_a, "rb", buffering=0) as file_a, open(path_b, "rb", buffering=0) as file_b:
        size_a = os.fstat(file_a.fileno()).st_size
        size_b = os.fstat(file_b.fileno()).st_size
        offset = 0
        while offset < min(size_a, size_b):
            block_a = file_a.read(_COMPARE_BLOCK)
            block_b = file_b.read(_COMPARE_BLOCK)
            if block_a != block_b:
                for index, (x, y) in enumerate(zip(block_a, block_b, strict=False)):
                    if x != y:
                        return offset + index
                return offset + min(len(block_a), len(block_b))
            offset += len(block_a)
        return None if size_a == size_b else min(size_a, size_b)
