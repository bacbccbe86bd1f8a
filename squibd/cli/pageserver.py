"""``squibd --page-server``: serve a snapshot's memory to VMs through userfaultfd.

Usage::

    squibd --page-server --snapshot FULL.snap [--memory-file FULL.mem]
           [--diff-snapshot D1.snap ...] [--diff-memory-file D1.mem ...]
           --socket PATH [--no-stream] [--fault-granule BYTES]
           [--max-vms N] [--handshake-timeout S] [--keep-serving]
    squibd --page-server --firecracker-snapshot F.snap --memory-file F.mem --socket PATH ...

A memory file defaults to its state file's path with ``.snap`` replaced by
``.mem``. With ``--firecracker-snapshot`` the pair is Firecracker's: only its
state file's header is read (to check it is one), the memory layout comes
from each VMM's handshake, and nothing can be digest-checked (logged once).

Once listening, the server prints ``listening PATH`` on stdout (a line to
wait for) and serves every VMM that connects, several at once (up to
``--max-vms``; more are refused at once). It exits when the last VMM it served
is gone (unless ``--keep-serving``) or on SIGTERM/SIGINT: 0, or 1 when a
corrupt chunk or a refused handshake stopped serving a VMM; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
from typing import Final

from squibd.snapshot.describe import FORMAT_FIRECRACKER, describe_snapshot
from squibd.snapshot.envelope import read_state_file
from squibd.snapshot.errors import SnapshotError
from squibd.uffd.errors import ChunkCorrupt, SnapshotMismatch, UffdError
from squibd.uffd.listener import DEFAULT_MAX_VMS, ServeLoop
from squibd.uffd.prefetch import prefetch_offsets
from squibd.uffd.server import DEFAULT_SERVER_HANDSHAKE_TIMEOUT_S, PageServer
from squibd.uffd.source import MemorySource, PageSource, RawMemorySource

__all__ = ["main"]

_STATE_SUFFIX: Final = ".snap"
_MEMORY_SUFFIX: Final = ".mem"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
#: Connections the kernel queues before the accept loop takes them (it takes them at once).
_BACKLOG: Final = 16


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squibd --page-server",
        description="Serve a snapshot's guest memory to VMs through userfaultfd "
        "(Firecracker-compatible handshake).",
    )
    parser.add_argument("--page-server", action="store_true", required=True, help="this mode")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--snapshot", help="the Full state file (or --store and --name)")
    which.add_argument(
        "--firecracker-snapshot", metavar="PATH",
        help="a state file Firecracker made (needs --memory-file; no digest checks)",
    )
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
    parser.add_argument(
        "--max-vms", type=int, default=DEFAULT_MAX_VMS,
        help=f"VMs served at once; more are refused (default {DEFAULT_MAX_VMS})",
    )
    parser.add_argument(
        "--handshake-timeout", type=float, default=DEFAULT_SERVER_HANDSHAKE_TIMEOUT_S,
        help="seconds a connected VMM has to send its handshake "
        f"(default {DEFAULT_SERVER_HANDSHAKE_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--keep-serving", action="store_true",
        help="keep accepting VMs after the last one is gone (until SIGTERM)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    parser.add_argument("--store", help="serve from this store ([stores.NAME] of --config)")
    parser.add_argument("--name", help="the snapshot's name in --store")
    parser.add_argument("--config", help="the configuration file naming --store")
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
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def _firecracker_source(state_path: str, memory_path: str, log: logging.Logger) -> RawMemorySource:
    """Check that ``state_path`` is a Firecracker state file; map its raw memory file."""
    description = describe_snapshot(state_path)
    if description.format != FORMAT_FIRECRACKER:
        detail = "; ".join(e.message for e in description.errors) or "it is a squibd snapshot"
        raise SnapshotMismatch(
            f"{state_path!r} is not a Firecracker state file ({detail}); "
            "give a squibd snapshot with --snapshot"
        )
    if description.crc_ok is False:
        raise SnapshotMismatch(f"{state_path!r} fails its CRC-64: the pair is damaged")
    source = RawMemorySource.open(memory_path, page_size=os.sysconf("SC_PAGE_SIZE"))
    log.warning(
        "serving Firecracker snapshot %s (state file version %s) with memory file %s: it has "
        "no squibd manifest, so no page is digest-checked; the memory layout comes from "
        "each VMM's handshake",
        state_path, description.version, memory_path,
    )
    return source


def _open(args: argparse.Namespace, log: logging.Logger) -> tuple[MemorySource, PageServer]:
    if args.firecracker_snapshot is not None:
        raw = _firecracker_source(args.firecracker_snapshot, args.memory_file, log)
        return raw, PageServer(
            raw, None, fault_granule=args.fault_granule, stream=not args.no_stream,
            handshake_timeout=args.handshake_timeout,
        )
    states = [read_state_file(args.snapshot)]
    memories = [_memory_path(args.snapshot, args.memory_file)]
    for index, diff in enumerate(args.diff_snapshot):
        states.append(read_state_file(diff))
        given = args.diff_memory_file[index] if args.diff_memory_file else None
        memories.append(_memory_path(diff, given))
    source = PageSource.open(
        [(mem, state.memory) for mem, state in zip(memories, states, strict=True)]
    )
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
        return source, PageServer(
            source,
            newest.memory.regions,
            prefetch=prefetch,
            fault_granule=args.fault_granule,
            stream=not args.no_stream,
            pair_id=newest.memory.pair_id,
            handshake_timeout=args.handshake_timeout,
        )
    except BaseException:
        source.close()
        raise


def main(argv: list[str]) -> int:
    """Run the page server with ``argv`` (including ``--page-server``); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), stream=sys.stderr, format="page-server: %(message)s"
    )
    if args.diff_memory_file and len(args.diff_memory_file) != len(args.diff_snapshot):
        parser.error("give one --diff-memory-file per --diff-snapshot, or none")
    if args.firecracker_snapshot is not None and not args.memory_file:
        parser.error("--firecracker-snapshot needs --memory-file")
    if args.firecracker_snapshot is not None and args.diff_snapshot:
        parser.error("--diff-snapshot needs --snapshot (a squibd chain)")
    if args.max_vms < 1 or args.handshake_timeout <= 0:
        parser.error("--max-vms and --handshake-timeout must be positive")
    log = logging.getLogger("squibd.uffd")
    if args.store is not None or (args.snapshot is None and args.firecracker_snapshot is None):
        from ._pageserver_store import serve_store

        return serve_store(parser, args)
    try:
        source, server = _open(args, log)
    except (SnapshotError, UffdError, OSError, ValueError) as exc:
        print(f"squibd --page-server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    try:
        listener = _bind(args.socket)
        try:
            loop = ServeLoop(server, listener, max_vms=args.max_vms,
                             keep_serving=args.keep_serving)
            if threading.current_thread() is threading.main_thread():
                for signum in (signal.SIGTERM, signal.SIGINT):
                    signal.signal(signum, lambda _signum, _frame: loop.stop())
            print(f"listening {args.socket}", flush=True)
            finished = loop.run()
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(args.socket)
    except (UffdError, OSError) as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    finally:
        source.close()
    return EXIT_FAILED if any(stats.error for stats in finished) else EXIT_OK
