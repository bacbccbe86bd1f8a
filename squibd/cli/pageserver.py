"""``squibd --page-server``: serve a snapshot's memory to one VM through userfaultfd.

Usage::

    squibd --page-server --snapshot FULL.snap [--memory-file FULL.mem]
           [--diff-snapshot D1.snap ...] [--diff-memory-file D1.mem ...]
           --socket PATH [--no-stream] [--fault-granule BYTES]

A memory file defaults to its state file's path with ``.snap`` replaced by
``.mem``. Once listening, the server prints ``listening PATH`` on stdout
(a line to wait for), serves one VM until it closes the connection, and
exits 0; a corrupt chunk or a refused handshake exits 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import stat
import sys
from typing import Final

from squibd.snapshot.envelope import read_state_file
from squibd.snapshot.errors import SnapshotError
from squibd.uffd.errors import ChunkCorrupt, UffdError
from squibd.uffd.prefetch import prefetch_offsets
from squibd.uffd.server import PageServer
from squibd.uffd.source import PageSource

__all__ = ["main"]

_STATE_SUFFIX: Final = ".snap"
_MEMORY_SUFFIX: Final = ".mem"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squibd --page-server",
        description="Serve a snapshot's guest memory to one VM through userfaultfd "
        "(Firecracker-compatible handshake).",
    )
    parser.add_argument("--page-server", action="store_true", required=True, help="this mode")
    parser.add_argument("--snapshot", required=True, help="the Full state file")
    parser.add_argument("--mem-file-path", "--memory-file", dest="memory_file",
                        help="its memory file (default: .snap -> .mem)")  # fmt: skip
    parser.add_argument(
        "--diff-snapshot", action="extend", nargs="+", default=[], metavar="PATH",
        help="Diff state files, oldest first (repeat the flag or list several)",
    )
    parser.add_argument(
        "--diff-mem-file-path", "--diff-memory-file", dest="diff_memory_file",
        action="extend", nargs="+", default=[], metavar="PATH",
        help="the memory file of each --diff-snapshot, in the same order",
    )
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on")
    parser.add_argument(
        "--no-stream", action="store_true", help="serve demand faults only (no background copy)"
    )
    parser.add_argument(
        "--fault-granule", type=int, default=0, help="bytes installed per fault (default: a page)"
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    return parser


def _memory_path(state_path: str, given: str | None) -> str:
    if given:
        return given
    if state_path.endswith(_STATE_SUFFIX):
        return state_path[: -len(_STATE_SUFFIX)] + _MEMORY_SUFFIX
    raise SystemExit(f"--memory-file is needed: {state_path!r} does not end in {_STATE_SUFFIX}")


def _bind(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # a stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


def main(argv: list[str]) -> int:
    """Run the page server with ``argv`` (including ``--page-server``); returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="page-server: %(message)s"
    )
    if args.diff_memory_file and len(args.diff_memory_file) != len(args.diff_snapshot):
        _parser().error("give one --diff-memory-file per --diff-snapshot, or none")
    log = logging.getLogger("squibd.uffd")
    try:
        states = [read_state_file(args.snapshot)]
        memories = [_memory_path(args.snapshot, args.memory_file)]
        for index, diff in enumerate(args.diff_snapshot):
            states.append(read_state_file(diff))
            given = args.diff_memory_file[index] if args.diff_memory_file else None
            memories.append(_memory_path(diff, given))
        source = PageSource.open(
            [(mem, state.memory) for mem, state in zip(memories, states, strict=True)]
        )
    except (SnapshotError, UffdError, OSError) as exc:
        print(f"squibd --page-server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        newest = states[-1]
        try:
            prefetch = prefetch_offsets(
                newest.vcpu_states, newest.memory.regions, source.read, source.page_size
            )
        except ChunkCorrupt as exc:
            # The vCPUs would touch it first: prefetching it refuses the handshake with
            # this error, so the load fails before any vCPU runs.
            log.error("%s", exc)
            prefetch = [exc.offset - exc.offset % source.page_size]
        server = PageServer(
            source,
            newest.memory.regions,
            prefetch=prefetch,
            fault_granule=args.fault_granule,
            stream=not args.no_stream,
            pair_id=newest.memory.pair_id,
        )
        listener = _bind(args.socket)
        try:
            print(f"listening {args.socket}", flush=True)
            conn, _ = listener.accept()
            with conn:
                stats = server.serve(conn)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(args.socket)
    except (UffdError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    finally:
        source.close()
    return EXIT_FAILED if stats.error else EXIT_OK
