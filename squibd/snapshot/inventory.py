"""Find, describe and delete snapshot pairs under directory roots (blocking; worker threads).

Listing walks each root for ``*.snap`` state files that load, pairs each with
its memory file (``<id>.mem`` beside it, else a file in the same directory
whose ``user.squibd.pair`` xattr names the pair) and reports the metadata that
``snapshot.create`` stored (labels, created_at, vm_id, host).

Deleting is crash-safe: a tombstone ``.<name>.squibd-delete`` naming both
files is written and fsynced first, then the state file (the pair's identity)
is unlinked, then the memory file, then the tombstone. A crash at any
instant leaves either the whole pair or a tombstone that the next listing or
deletion under that root (and the daemon's start) finishes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator, Sequence
from typing import Any, Final

import attrs

from .envelope import read_state_file
from .errors import InvalidPath, Io, SnapshotError
from .journal import fsync_dir
from .models import MicrovmState
from .pairing import read_pair_xattr

__all__ = [
    "SNAP_SUFFIX",
    "TOMBSTONE_SUFFIX",
    "HasDependents",
    "SnapshotEntry",
    "delete_pair",
    "finish_deletes",
    "list_pairs",
]

log = logging.getLogger("squibd.snapshot")

SNAP_SUFFIX: Final = ".snap"
_MEM_SUFFIX: Final = ".mem"
TOMBSTONE_SUFFIX: Final = ".squibd-delete"
#: Bytes of a 512-byte block (st_blocks' unit, stat(2)).
_BLOCK: Final = 512


class HasDependents(SnapshotError):
    """A Diff under the same roots has this pair as its parent (delete with ``force``)."""

    kind = "HasDependents"

    def __init__(self, path: str, children: Sequence[str]) -> None:
        self.path = path
        self.children = tuple(children)
        names = ", ".join(self.children)
        super().__init__(
            f"{path} is the parent of {names}; delete those first, or pass force "
            "(squibctl snapshot delete --force) to leave them without a parent"
        )


@attrs.frozen
class SnapshotEntry:
    """One pair, as ``snapshot.list`` shows it."""

    snapshot_path: str
    mem_file_path: str | None
    pair_id: str
    parent_pair_id: str | None
    snapshot_type: str
    vm_id: str | None
    created_at: str | None
    host: str | None
    labels: dict[str, str]
    size_bytes: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return attrs.asdict(self)


def _disk_size(path: str | None) -> int:
    if path is None:
        return 0
    try:
        st = os.stat(path)
    except OSError:
        return 0
    return int(st.st_blocks) * _BLOCK


def _memory_file(snap: str, pair_id: str) -> str | None:
    if snap.endswith(SNAP_SUFFIX):
        candidate = snap[: -len(SNAP_SUFFIX)] + _MEM_SUFFIX
    else:
        candidate = snap + _MEM_SUFFIX
    if os.path.isfile(candidate):
        return candidate
    directory = os.path.dirname(snap)
    with contextlib.suppress(OSError), os.scandir(directory) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            with contextlib.suppress(SnapshotError):
                if read_pair_xattr(entry.path) == pair_id:
                    return entry.path
    return None


def _entry(path: str, state: MicrovmState) -> SnapshotEntry:
    manifest = state.memory
    meta = state.metadata
    mem = _memory_file(path, manifest.pair_id)
    return SnapshotEntry(
        snapshot_path=path,
        mem_file_path=mem,
        pair_id=manifest.pair_id,
        parent_pair_id=manifest.parent_pair_id,
        snapshot_type=manifest.kind,
        vm_id=None if meta is None else meta.vm_id,
        created_at=None if meta is None else meta.created_at,
        host=None if meta is None else meta.host,
        labels={} if meta is None else dict(meta.labels),
        size_bytes=_disk_size(path) + _disk_size(mem),
    )


def _state_files(root: str) -> Iterator[str]:
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.endswith(SNAP_SUFFIX) and not name.startswith("."):
                yield os.path.join(directory, name)


def _scan(roots: Sequence[str]) -> Iterator[SnapshotEntry]:
    seen: set[str] = set()
    for root in roots:
        if not os.path.isdir(root):
            continue
        finish_deletes(root)
        for path in _state_files(root):
            real = os.path.realpath(path)
            if real in seen:
                continue
            seen.add(real)
            try:
                state = read_state_file(path, recover=False)
            except SnapshotError as exc:
                log.debug("snapshot list: skipping %s: %s", path, exc)
                continue
            yield _entry(path, state)


def _label_matches(labels: dict[str, str], selector: str) -> bool:
    key, sep, value = selector.partition("=")
    if not sep:
        return key in labels
    return labels.get(key) == value


def list_pairs(
    roots: Sequence[str], *, vm_id: str | None = None, label: str | None = None
) -> list[SnapshotEntry]:
    """Every loadable pair under ``roots``, oldest first (by ``created_at``, then path).

    Args:
        vm_id: only pairs saved from this VM.
        label: ``KEY=VALUE`` (that label with that value) or ``KEY`` (that label present).
    """
    out = [
        entry
        for entry in _scan(roots)
        if (vm_id is None or entry.vm_id == vm_id)
        and (label is None or _label_matches(entry.labels, label))
    ]
    out.sort(key=lambda e: (e.created_at or "", e.snapshot_path))
    return out


def _tombstone_for(snapshot_path: str) -> str:
    directory, name = os.path.split(snapshot_path)
    return os.path.join(directory, f".{name}{TOMBSTONE_SUFFIX}")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _finish(tombstone: str) -> None:
    """State file first (the pair stops existing), then the memory file, then the tombstone."""
    with open(tombstone, encoding="utf-8") as f:
        record = json.load(f)
    dirs = {os.path.dirname(tombstone)}
    for key in ("snapshot_path", "mem_file_path"):
        path = record.get(key)
        if isinstance(path, str):
            _unlink(path)
            dirs.add(os.path.dirname(path))
    for directory in sorted(dirs):
        fsync_dir(directory)
    os.unlink(tombstone)
    fsync_dir(os.path.dirname(tombstone))


def finish_deletes(root: str) -> int:
    """Complete the deletions a crash interrupted under ``root``; returns how many."""
    done = 0
    for directory, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if name.startswith(".") and name.endswith(TOMBSTONE_SUFFIX):
                try:
                    _finish(os.path.join(directory, name))
                    done += 1
                except (OSError, ValueError) as exc:
                    log.warning("cannot finish deleting %s: %s", name, exc)
    return done


def delete_pair(
    snapshot_path: str, roots: Sequence[str], *, force: bool = False
) -> SnapshotEntry:
    """Delete the pair of ``snapshot_path`` crash-safely; returns what was deleted.

    Raises:
        InvalidPath: ``snapshot_path`` is not a regular file.
        HasDependents: a Diff under ``roots`` has it as parent (unless ``force``).
        Io: a file cannot be removed; every error of ``read_state_file``.
    """
    try:
        st = os.lstat(snapshot_path)
    except FileNotFoundError:
        raise InvalidPath(f"snapshot_path {snapshot_path} does not exist") from None
    except OSError as exc:
        raise Io(exc) from exc
    if not stat.S_ISREG(st.st_mode):
        raise InvalidPath(f"snapshot_path {snapshot_path} is not a regular file")
    state = read_state_file(snapshot_path)
    entry = _entry(snapshot_path, state)
    if not force:
        children = [
            other.snapshot_path
            for other in _scan(roots)
            if other.parent_pair_id == entry.pair_id and other.snapshot_path != snapshot_path
        ]
        if children:
            raise HasDependents(snapshot_path, children)
    tombstone = _tombstone_for(snapshot_path)
    record = {"snapshot_path": snapshot_path, "mem_file_path": entry.mem_file_path}
    try:
        fd = os.open(tombstone, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(os.path.dirname(tombstone))
        _finish(tombstone)
    except OSError as exc:
        raise Io(exc) from exc
    return entry
