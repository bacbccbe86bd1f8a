"""``squibd --page-server --store NAME --name SNAP --config FILE --socket PATH``.

Serves one VM straight from a snapshot store (chunks fetched on demand,
verified, cached locally): prints ``listening PATH`` once bound, exits 0
when the VMM closes the socket, 1 on a corrupt or missing chunk, 2 on usage
or configuration errors.
"""

from __future__ import annotations

import argparse
import sys

from squibd.config import ConfigError, load_config
from squibd.store.child import serve_snapshot

__all__ = ["serve_store"]


def serve_store(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the store page server for parsed ``args``; returns the exit code."""
    if args.store is None or args.name is None or args.config is None:
        parser.error("give --snapshot, or --store, --name and --config")
    if args.diff_snapshot or args.memory_file:
        parser.error("--store serves a stored snapshot: no --memory-file or --diff-snapshot")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"squibd --page-server: {exc}", file=sys.stderr)
        return 2
    if args.store not in config.stores:
        print(f"squibd --page-server: no [stores.{args.store}] in {args.config}",
              file=sys.stderr)
        return 2
    return serve_snapshot(args.store, config.stores[args.store], args.name, args.socket,
                          sys.stdout)
