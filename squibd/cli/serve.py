"""``squibd [--socket PATH] [--config FILE] [--debug-api] [--log-level LEVEL]``: the daemon.

Listens on the socket systemd or launchd passed (socket activation), else
binds ``--socket`` (default ``$XDG_RUNTIME_DIR/squibd.sock``, else
``/run/squibd/squibd.sock``). Exit codes: 0 after a graceful stop, 1 when
the daemon cannot start (socket in use, ...), 2 for usage or configuration
errors.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from typing import Final

import attrs
import trio

from squibd import __version__
from squibd.api import ApiContext
from squibd.config import ConfigError, DaemonConfig, default_socket_path, load_config
from squibd.server import (
    DaemonAlreadyRunning,
    Notifier,
    Server,
    SocketPathOccupied,
    bind_unix_socket,
    launchd_sockets,
    systemd_sockets,
)
from squibd.snapshot.errors import SnapshotError
from squibd.vmm.statedir import vm_process_settings

__all__ = ["build_parser", "main"]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
_LOG_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: journald adds its own timestamps (systemd.exec(5): $JOURNAL_STREAM is set for it).
_JOURNAL_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"

log = logging.getLogger("squibd")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's argument parser."""
    parser = argparse.ArgumentParser(
        prog="squibd",
        description="Save and restore running KVM virtual machines; JSON-RPC over a Unix socket.",
        epilog="Offline tools: squibd --describe-snapshot PATH, squibd --rebase-snapshot ..., "
        "squibd --page-server ... (each has its own --help).",
    )
    parser.add_argument("--socket", help="listening socket path (default: %(default)s)",
                        default=None)  # fmt: skip
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument("--debug-api", action="store_true", default=None,
                        help="expose vm.read_memory and vm.write_memory")  # fmt: skip
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="log verbosity (default: info)")  # fmt: skip
    parser.add_argument("--state-dir", default=None,
                        help="private directory of VM-process sockets and records (issue 11)")
    parser.add_argument("--vm-isolation", choices=("process", "inprocess"), default=None,
                        help="one VM process per VM, or VMs inside the daemon")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"squibd {__version__}")
    return parser


def _apply_overrides(config: DaemonConfig, args: argparse.Namespace) -> DaemonConfig:
    server = config.server
    if args.socket is not None:
        server = attrs.evolve(server, socket=args.socket)
    if args.debug_api:
        server = attrs.evolve(server, debug_api=True)
    if args.log_level is not None:
        server = attrs.evolve(server, log_level=args.log_level)
    if args.state_dir is not None:
        server = attrs.evolve(server, state_dir=args.state_dir)
    if args.vm_isolation is not None:
        server = attrs.evolve(server, vm_isolation=args.vm_isolation)
    return attrs.evolve(config, server=server)


def _setup_logging(level: str) -> None:
    fmt = _JOURNAL_FORMAT if os.environ.get("JOURNAL_STREAM") else _LOG_FORMAT
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


def _recover(config: DaemonConfig) -> None:
    roots = config.snapshot.allowed_roots or ()
    if not roots:
        return
    try:
        from squibd.snapshot.commit import recover_directory
    except ImportError:  # the commit module is not part of this build
        return
    for root in roots:
        if os.path.isdir(root):
            recover_directory(root)


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = _apply_overrides(load_config(args.config), args)
    except ConfigError as exc:
        print(f"squibd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    _setup_logging(config.server.log_level)
    sockets = systemd_sockets() or launchd_sockets()
    owned: list[str] = []
    if sockets:
        log.info("using %d socket(s) from the service manager", len(sockets))
    else:
        path = config.server.socket or default_socket_path()
        try:
            sockets = [
                bind_unix_socket(
                    path, mode=config.server.socket_mode, group=config.server.socket_group
                )
            ]
        except (DaemonAlreadyRunning, SocketPathOccupied) as exc:
            print(f"squibd: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        except SnapshotError as exc:  # InvalidPath
            print(f"squibd: --socket: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (OSError, KeyError) as exc:
            print(f"squibd: cannot listen on {path}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        owned.append(path)
        log.info("listening on %s", path)
    _recover(config)
    api = ApiContext(
        debug_api=config.server.debug_api,
        allowed_roots=config.snapshot.allowed_roots,
        quiesce_timeout_s=config.snapshot.quiesce_timeout_s,
        limits=attrs.asdict(config.limits),
        **vm_process_settings(config.server),
    )
    server = Server(config, api, sockets, owned, Notifier.from_environ())
    # Everything imported so far lives as long as the daemon: keep it out of the
    # collector's generations so full collections stay short (lower tail latency).
    gc.freeze()
    try:
        trio.run(server.serve)
    finally:
        for sock in sockets:
            sock.close()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
