"""Rebase: merge a Diff chain onto its parent Full (SPEC sections 4 and 11.7).

Theory of operation
-------------------
``rebase(base, [diff1, diff2, ...], out)`` produces a Full pair equal, byte
for byte, to a Full snapshot taken at the last Diff's checkpoint:

1. read every state file; the base must be a Full and each Diff's
   ``parent_pair_id`` must name the previous pair; all layouts must agree;
2. check each memory file against its manifest (``verify`` mode ``size`` by
   default: size and pair xattr, and a full digest check of a file without
   the xattr, ``verify.check_pair_binding``; ``full`` re-hashes everything);
3. open a :class:`~squibd.snapshot.commit.PairTransaction` for the output
   and fill its memory temp: the base's extents, then each Diff's extents
   in order (by the manifests, never by probing holes), with
   ``copy_file_range`` where the kernel allows it and ``pread``/``pwrite``
   otherwise;
4. digest the merged extents from the temp, set the pair xattr, build the
   Full manifest and commit the pair with the last Diff's state.

The output keeps the last Diff's ``pair_id``: it is the same checkpoint, so
later Diffs (whose parent is that checkpoint) still apply to it. Because the
output is committed like a save, a SIGKILL at any instant leaves the old
output pair or the new one after recovery, and the inputs are only read,
so rebasing in place (output = base) is safe too.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Sequence
from typing import Final

import attrs

from .commit import PairCancelled, PairTransaction, StepHook
from .digest import DEFAULT_ALGORITHM, file_chunk_digests, read_pieces
from .envelope import encode_state, read_state_file
from .errors import MemoryIo
from .manifest import (
    DEFAULT_CHUNK_SIZE,
    KIND_DIFF,
    KIND_FULL,
    Extent,
    MemoryManifest,
    split_at_boundaries,
)
from .memerrors import MemoryInputInvalid, MemoryPairMismatch
from .memwriter import merge_extents, set_pair_xattr
from .models import MicrovmState
from .paths import open_client_file
from .verify import verify_fd

__all__ = ["MEM_SUFFIX", "SNAP_SUFFIX", "memory_path_for", "rebase"]

#: Conventional suffixes of a pair (SPEC section 1: ``<id>.snap`` + ``<id>.mem``).
SNAP_SUFFIX: Final = ".snap"
MEM_SUFFIX: Final = ".mem"
#: Largest single copy request (copy_file_range and the pread fallback).
_COPY_BLOCK: Final = 8 * 1024 * 1024
#: Extents shorter than this are copied by pread/pwrite in batches (_copy_extents).
_SMALL_COPY: Final = 256 * 1024


def memory_path_for(snapshot_path: str) -> str:
    """The memory file of a pair: ``X.snap`` -> ``X.mem``.

    Raises:
        MemoryInputInvalid: the path does not end in ``.snap`` (give the memory path then).
    """
    if not snapshot_path.endswith(SNAP_SUFFIX):
        raise MemoryInputInvalid(
            f"cannot infer the memory file of {snapshot_path!r} (no {SNAP_SUFFIX} suffix); "
            "name it explicitly"
        )
    return snapshot_path[: -len(SNAP_SUFFIX)] + MEM_SUFFIX


def _check_chain(states: Sequence[MicrovmState]) -> None:
    base = states[0].memory
    if base.kind != KIND_FULL:
        raise MemoryInputInvalid("the base of a rebase must be a Full snapshot, not a Diff")
    previous = base
    for index, state in enumerate(states[1:], start=1):
        manifest = state.memory
        if manifest.kind != KIND_DIFF:
            raise MemoryInputInvalid(f"snapshot {index} of the chain is a Full, not a Diff")
        if manifest.parent_pair_id != previous.pair_id:
            raise MemoryPairMismatch(
                f"diff {index} applies to pair {manifest.parent_pair_id}, "
                f"but the chain before it ends at pair {previous.pair_id}"
            )
        if (manifest.regions, manifest.file_size, manifest.page_size) != (
            base.regions, base.file_size, base.page_size
        ):
            raise MemoryInputInvalid(f"diff {index} has another memory layout than the base")
        previous = manifest


def _copy_range(src: int, dst: int, offset: int, length: int) -> None:
    """Copy ``length`` bytes at ``offset`` from ``src`` to the same offset of ``dst``."""
    done = 0
    use_kernel_copy = True
    while done < length:
        count = min(length - done, _COPY_BLOCK)
        if use_kernel_copy:
            try:
                copied = os.copy_file_range(src, dst, count, offset + done, offset + done)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                use_kernel_copy = False
                continue
        else:
            data = os.pread(src, count, offset + done)
            view = memoryview(data)
            written = 0
            while written < len(view):
                written += os.pwrite(dst, view[written:], offset + done + written)
            copied = len(data)
        if copied == 0:
            raise MemoryIo(errno.EIO)  # the source ended inside an extent: truncated
        done += copied


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _copy_extents(
    src: int,
    dst: int,
    extents: Sequence[Extent],
    span_limit: int,
    check_cancelled: Callable[[], None] = lambda: None,
) -> None:
    """Copy extents to the same offsets of ``dst``.

    Large extents go through :func:`_copy_range` (``copy_file_range``); runs of
    small extents within ``span_limit`` bytes are read with one ``pread`` and
    written piece by piece (a scattered Diff or page map has hundreds of
    thousands of single pages: one kernel copy each would dominate).
    ``check_cancelled`` is called before each copy and raises to stop.
    """
    buffer = memoryview(bytearray(span_limit))
    pending: list[Extent] = []

    def flush() -> None:
        check_cancelled()
        if len(pending) == 1:
            _copy_range(src, dst, pending[0].offset, pending[0].length)
        elif pending:
            views = read_pieces(src, buffer, [(e.offset, e.length) for e in pending])
            for extent, view in zip(pending, views, strict=True):
                _pwrite_all(dst, view, extent.offset)
        pending.clear()

    try:
        for extent in extents:
            if pending and extent.end - pending[0].offset > span_limit:
                flush()
            if extent.length >= _SMALL_COPY:
                flush()
                check_cancelled()
                _copy_range(src, dst, extent.offset, extent.length)
            else:
                pending.append(extent)
        flush()
    finally:
        buffer.release()


def rebase(
    base_snap: str,
    diff_snaps: Sequence[str],
    out_snap: str,
    out_mem: str | None = None,
    *,
    base_mem: str | None = None,
    diff_mems: Sequence[str | None] | None = None,
    verify_mode: str = "size",
    staging_dir: str | None = None,
    step_hook: StepHook | None = None,
    allowed_roots: Sequence[str] | None = None,
    cancel: threading.Event | None = None,
) -> MemoryManifest:
    """Merge ``diff_snaps`` (in order) onto the Full ``base_snap`` into a new Full pair.

    Args:
        base_snap: the Full state file; its memory file is ``base_mem`` or inferred.
        diff_snaps: the Diff state files, oldest first (at least one).
        out_snap: the output state file; its memory file is ``out_mem`` or inferred.
        diff_mems: memory files of the Diffs (None entries are inferred).
        verify_mode: how inputs are checked first: ``size`` (default) or ``full``.
        staging_dir: passed to the pair transaction.
        step_hook: test-only, passed to the pair transaction.
        allowed_roots: if given, every input and output must lie inside one.
        cancel: when set before the commit point, the merge stops, the pair
            transaction aborts and ``PairCancelled`` is raised; once the
            commit record is written it is not looked at.

    Returns:
        The manifest of the committed output.

    Raises:
        SnapshotError: a typed error (``MemoryPairMismatch`` for a broken chain,
            ``MemoryIo`` for I/O, the state-file kinds for a bad state file);
            the output paths keep their previous pair.
        PairCancelled: ``cancel`` was set before the commit point.
    """
    if not diff_snaps:
        raise MemoryInputInvalid("a rebase needs at least one Diff")
    mems_given = list(diff_mems) if diff_mems is not None else [None] * len(diff_snaps)
    if len(mems_given) != len(diff_snaps):
        raise MemoryInputInvalid(f"{len(mems_given)} memory files for {len(diff_snaps)} diffs")
    snaps = [base_snap, *diff_snaps]
    mems = [base_mem or memory_path_for(base_snap)]
    mems += [mem or memory_path_for(snap) for snap, mem in zip(diff_snaps, mems_given, strict=True)]
    out_mem_path = out_mem or memory_path_for(out_snap)
    states = [read_state_file(snap, allowed_roots=allowed_roots) for snap in snaps]
    _check_chain(states)
    fds: list[int] = []
    try:
        for mem, state in zip(mems, states, strict=True):
            try:
                fds.append(open_client_file(mem, "mem_file_path", allowed_roots))
            except OSError as error:
                raise MemoryIo(error) from error
            verify_fd(fds[-1], state.memory, verify_mode)
        return _merge(states, fds, out_snap, out_mem_path, staging_dir, step_hook, allowed_roots,
                      cancel)  # fmt: skip
    finally:
        for fd in fds:
            os.close(fd)


def _merge(
    states: Sequence[MicrovmState],
    fds: Sequence[int],
    out_snap: str,
    out_mem: str,
    staging_dir: str | None,
    step_hook: StepHook | None,
    allowed_roots: Sequence[str] | None = None,
    cancel: threading.Event | None = None,
) -> MemoryManifest:
    last = states[-1]
    size = last.memory.file_size
    with PairTransaction(out_snap, out_mem, staging_dir=staging_dir, step_hook=step_hook,
                         allowed_roots=allowed_roots, cancel=cancel) as txn:  # fmt: skip
        try:
            os.ftruncate(txn.mem_fd, size)
            for state, fd in zip(states, fds, strict=True):
                _copy_extents(fd, txn.mem_fd, state.memory.extents, DEFAULT_CHUNK_SIZE,
                              txn.check_cancelled)  # fmt: skip
            extents = split_at_boundaries(
                merge_extents([e for s in states for e in s.memory.extents]),
                sorted(region.file_offset for region in last.memory.regions[1:]),
            )
            digests = file_chunk_digests(txn.mem_fd, extents, cancel=cancel,
                                         cancelled=PairCancelled)  # fmt: skip
        except OSError as error:
            raise MemoryIo(error) from error
        manifest = attrs.evolve(
            last.memory,
            kind=KIND_FULL,
            parent_pair_id=None,
            extents=extents,
            digest_algorithm=DEFAULT_ALGORITHM,
            chunk_size=DEFAULT_CHUNK_SIZE,
            digests=digests,
            page_map=None,  # the list form; encode_state compacts it again if it is long
        )
        set_pair_xattr(txn.mem_fd, manifest.pair_id)
        txn.commit(encode_state(attrs.evolve(last, memory=manifest)), mem_size=size)
    return manifest
