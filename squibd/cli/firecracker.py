"""``squibd --firecracker-api-socket PATH [--id ID]``: one empty VM slot, Firecracker's API only.

For tooling that spawns one API socket per microVM and configures it over
HTTP: the process serves Firecracker's REST API for one VM on ``PATH``
(mode 0600, the allow list of ``[server]``) and no JSON-RPC socket. The VM
does not exist until ``PUT /actions {"action_type": "InstanceStart"}``
(after ``PUT /machine-config`` and ``PUT /boot-source`` with
``kernel_image_path`` ``builtin:counter`` or ``builtin:memwriter``) or
``PUT /snapshot/load``. SIGTERM/SIGINT destroy the VM, remove the socket
and exit 0. Exit codes: 1 when the socket cannot be bound, 2 for usage or
configuration errors.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import socket
import sys
from typing import Final

import trio

from squibd import __version__
from squibd.api import ApiContext
from squibd.api.firecracker import DEFAULT_SLOT_ID, FirecrackerApp
from squibd.api.models import VM_ID_PATTERN
from squibd.config import ConfigError, load_config
from squibd.server import (
    DaemonAlreadyRunning,
    SocketPathOccupied,
    bind_api_socket,
    serve_http,
)
from squibd.snapshot.errors import SnapshotError
from squibd.vm.memory import DEFAULT_MEMORY_LAYOUT, MEMORY_LAYOUTS

__all__ = ["build_parser", "main"]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
_LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

log = logging.getLogger("squibd.firecracker")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the slot mode."""
    parser = argparse.ArgumentParser(
        prog="squibd --firecracker-api-socket",
        description="Serve Firecracker's REST API for one (initially empty) VM slot.",
    )
    parser.add_argument("--firecracker-api-socket", required=True, metavar="PATH",
                        help="the API socket to create (mode 0600)")  # fmt: skip
    parser.add_argument("--id", default=DEFAULT_SLOT_ID,
                        help="the instance (VM) id (default: %(default)s)")  # fmt: skip
    parser.add_argument("--memory-layout", choices=MEMORY_LAYOUTS, default=DEFAULT_MEMORY_LAYOUT,
                        help="RAM layout of a VM started here (default: %(default)s)")  # fmt: skip
    parser.add_argument("--config", help="TOML configuration file ([server] allow list, "
                        "[snapshot] allowed_roots and quiesce_timeout_s)")  # fmt: skip
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        default=None, help="log verbosity (default: info)")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"squibd {__version__}")
    return parser


async def _serve(sock: socket.socket, app: FirecrackerApp, api: ApiContext,
                 allowed_uids: frozenset[int], allowed_gids: tuple[int, ...],
                 idle_timeout_s: float) -> None:  # fmt: skip
    try:
        # The signal receiver is in place before the socket is served, so a
        # SIGTERM never finds the default action (no cleanup).
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: serve_http(
                        sock, app, allowed_uids=allowed_uids, allowed_gids=allowed_gids,
                        idle_timeout_s=idle_timeout_s, task_status=task_status,
                    )
                )  # fmt: skip
                log.info("serving Firecracker's API for %s (pid %d)", app.vm_id, os.getpid())
                async for signum in signals:
                    log.info("received %s", signal.Signals(signum).name)
                    break
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await api.aclose()


def main(argv: list[str] | None = None) -> int:
    """Run the slot until SIGTERM/SIGINT; returns the exit code."""
    arguments = sys.argv[1:] if argv is None else argv
    if "-h" in arguments or "--help" in arguments:  # also right after the mode flag
        build_parser().print_help()
        return 0
    args = build_parser().parse_args(arguments)
    if not re.fullmatch(VM_ID_PATTERN, args.id):
        print(f"squibd: --id {args.id!r}: expected 1-64 of [A-Za-z0-9_-]", file=sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"squibd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = args.log_level or config.server.log_level
    logging.basicConfig(level=level.upper(), format=_LOG_FORMAT, stream=sys.stderr, force=True)
    path = args.firecracker_api_socket
    try:
        sock = bind_api_socket(path)
    except (DaemonAlreadyRunning, SocketPathOccupied) as exc:
        print(f"squibd: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except SnapshotError as exc:  # InvalidPath
        print(f"squibd: --firecracker-api-socket: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"squibd: cannot listen on {path}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    api = ApiContext(
        allowed_roots=config.snapshot.allowed_roots,
        quiesce_timeout_s=config.snapshot.quiesce_timeout_s,
    )
    app = FirecrackerApp(api, args.id, memory_layout=args.memory_layout)
    server = config.server
    try:
        trio.run(_serve, sock, app, api, server.effective_allowed_uids(), server.allowed_gids,
                 server.idle_timeout_s)  # fmt: skip
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
