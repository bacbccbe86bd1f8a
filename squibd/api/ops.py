
"""Operator methods: ``snapshot.list`` and ``snapshot.delete`` (issue 13).

Both walk directories in a worker thread (:mod:`squibd.snapshot.inventory`).
The roots are the configured ``[snapshot] allowed_roots``, else the daemon's
state directory; a ``root`` param must lie inside them when allowed roots
are configured.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Final

import attrs
import trio

from squibd.rpc import RpcError
from squibd.snapshot.inventory import SnapshotEntry, delete_pair, list_pairs
from squibd.snapshot.models import SnapshotMetadata
from squibd.snapshot.paths import is_within, validate_path

from .context import ApiContext, CallInfo
from .errors import not_allowed
from .wire import wire_field

__all__ = [
    "SnapshotDeleteParams",
    "SnapshotDeleteResult",
    "SnapshotListEntry",
    "SnapshotListParams",
    "SnapshotListResult",
    "snapshot_delete",
    "snapshot_list",
    "snapshot_metadata",
]

_LABEL_SELECTOR: Final = r"[A-Za-z0-9_.\-/]{1,63}(=.{0,255})?"


def snapshot_metadata(vm_id: str, labels: dict[str, str]) -> SnapshotMetadata:
    """What ``snapshot.create`` stores in the state file beside the VM state."""
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
    return SnapshotMetadata(
        created_at=now.replace("+00:00", "Z"),
        vm_id=vm_id,
        host=socket.gethostname(),
        labels=dict(labels),
    )


@attrs.frozen
class SnapshotListParams:
    """``snapshot.list``: filters (all optional)."""

    root: str | None = wire_field(
        default=None, description="only this directory (inside the allowed roots)"
    )
    vm_id: str | None = wire_field(default=None, description="only pairs saved from this VM")
    label: str | None = wire_field(
        default=None,
        description="KEY=VALUE (that label with that value) or KEY (label present)",
        pattern=_LABEL_SELECTOR,
    )


#: One pair of ``snapshot.list``: the inventory's own value (snapshot_path, mem_file_path,
#: pair_id, parent_pair_id, snapshot_type, vm_id, created_at, host, labels, size_bytes).
SnapshotListEntry = SnapshotEntry


@attrs.frozen
class SnapshotListResult:
    """``snapshot.list``: the pairs, oldest first."""

    snapshots: list[SnapshotListEntry]


@attrs.frozen
class SnapshotDeleteParams:
    """``snapshot.delete``: remove a pair (state file and memory file) crash-safely."""

    snapshot_path: str = wire_field(description="the pair's state file")
    force: bool = wire_field(
        default=False, description="delete even when a Diff under the roots has it as parent"
    )


@attrs.frozen
class SnapshotDeleteResult:
    """``snapshot.delete``: what was removed."""

    snapshot_path: str
    mem_file_path: str | None
    pair_id: str
    deleted: bool


def _roots(api: ApiContext) -> list[str]:
    if api.allowed_roots:
        return [os.path.realpath(r) for r in api.allowed_roots]
    if api.state_dir is not None:
        return [api.state_dir]
    return []


def _list_roots(api: ApiContext, root: str | None) -> list[str]:
    if root is None:
        roots = _roots(api)
        if not roots:
            raise RpcError.invalid_params(
                "params.root: required (no [snapshot] allowed_roots and no state directory)"
            )
        return roots
    validate_path(root, what="root")
    real = os.path.realpath(root)
    if api.allowed_roots is not None and not any(
        is_within(real, os.path.realpath(r)) for r in api.allowed_roots
    ):
        raise not_allowed(f"root {root} is outside the allowed roots ([snapshot] allowed_roots)")
    return [real]


async def snapshot_list(
    api: ApiContext, call: CallInfo, params: SnapshotListParams
) -> SnapshotListResult:
    """The pairs under the roots, with their metadata."""
    roots = _list_roots(api, params.root)
    entries = await trio.to_thread.run_sync(
        lambda: list_pairs(roots, vm_id=params.vm_id, label=params.label)
    )
    return SnapshotListResult(
        snapshots=list(entries)
    )


async def snapshot_delete(
    api: ApiContext, call: CallInfo, params: SnapshotDeleteParams
) -> SnapshotDeleteResult:
    """Delete one pair; refused while a Diff depends on it (unless ``force``)."""
    path = validate_path(params.snapshot_path, allowed_roots=api.allowed_roots)
    roots = list(dict.fromkeys([*_roots(api), os.path.dirname(os.path.realpath(path))]))
    entry = await trio.to_thread.run_sync(
        lambda: delete_pair(path, roots, force=params.force)
    )
    return SnapshotDeleteResult(
        snapshot_path=entry.snapshot_path,
        mem_file_path=entry.mem_file_path,
        pair_id=entry.pair_id,
        deleted=True,
    )
