"""``squibctl store push|list|pull|restore|delete|gc``: the store.* methods (issue 12)."""

from __future__ import annotations

import argparse
import os
from typing import Any, Final

from ._commands import help_of

__all__ = ["AREA", "LONG", "add_parser", "request_of"]

#: The subcommand group (squibctl's extension interface, see ``ctl.py``).
AREA: Final = "store"
#: store methods that report $/progress (a progress bar on a terminal).
LONG: Final = frozenset({"store.push", "store.pull", "store.restore"})


def _path(text: str) -> str:
    """Resolved against squibctl's working directory (the daemon's differs)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return os.path.abspath(text)


def add_parser(sub: Any) -> None:
    """Add the ``store`` subcommands to squibctl's subparsers."""
    store = sub.add_parser("store", help="snapshot stores (S3, file://)").add_subparsers(
        dest="verb", required=True)
    push = store.add_parser("push", help=help_of("store.push"))
    push.add_argument("snapshot_path", type=_path)
    push.add_argument("--store", required=True)
    push.add_argument("--name", required=True)
    listing = store.add_parser("list", help=help_of("store.list"))
    listing.add_argument("--store", required=True)
    listing.add_argument("--prefix", default="")
    pull = store.add_parser("pull", help=help_of("store.pull"))
    pull.add_argument("name")
    pull.add_argument("--store", required=True)
    pull.add_argument("--snapshot-path", required=True, type=_path)
    pull.add_argument("--mem-file-path", required=True, type=_path)
    restore = store.add_parser("restore", help=help_of("store.restore"))
    restore.add_argument("vm_id")
    restore.add_argument("name")
    restore.add_argument("--store", required=True)
    restore.add_argument("--eager", action="store_true", help="pull everything first")
    restore.add_argument("--resume", action="store_true", dest="resume_vm")
    restore.add_argument("--track-dirty-pages", action="store_true")
    delete = store.add_parser("delete", help=help_of("store.delete"))
    delete.add_argument("name")
    delete.add_argument("--store", required=True)
    gc = store.add_parser("gc", help=help_of("store.gc"))
    gc.add_argument("--store", required=True)
    gc.add_argument("--grace-s", type=int, default=3600)
    for sp in (push, pull, restore):
        sp.add_argument("--progress", action="store_true", default=None,
                        help="show a progress bar even when stderr is not a terminal")


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The (method, params) of a ``squibctl store ...`` command line."""
    verb = args.verb
    if verb == "push":
        return "store.push", {"snapshot_path": args.snapshot_path, "store": args.store,
                              "name": args.name}
    if verb == "list":
        return "store.list", {"store": args.store, "prefix": args.prefix}
    if verb == "pull":
        return "store.pull", {"store": args.store, "name": args.name,
                              "snapshot_path": args.snapshot_path,
                              "mem_file_path": args.mem_file_path}
    if verb == "restore":
        return "store.restore", {"vm_id": args.vm_id, "store": args.store, "name": args.name,
                                 "lazy": not args.eager, "resume_vm": args.resume_vm,
                                 "track_dirty_pages": args.track_dirty_pages}
    if verb == "delete":
        return "store.delete", {"store": args.store, "name": args.name}
    return "store.gc", {"store": args.store, "grace_s": args.grace_s}
