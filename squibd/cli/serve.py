"""``squibd [--socket PATH] [--config FILE] [--debug-api] [--log-level LEVEL] ...``: the daemon.

Listens on the socket systemd or launchd passed (socket activation), else
binds ``--socket`` (default ``$XDG_RUNTIME_DIR/squibd.sock``, else
``/run/squibd/squibd.sock``). Exit codes: 0 after a graceful stop, 1 when
the daemon cannot start (socket in use, ...), 2 for usage or configuration
errors.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import sys
from typing import Final

import attrs
import trio

from squibd import __version__
from squibd.api import ApiContext
from squibd.config import (
    ON_SHUTDOWN_MODES,
    ConfigError,
    DaemonConfig,
    default_socket_path,
    load_config,
)
from squibd.metrics import Metrics
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
from squibd.snapshot.paths import set_daemon_roots
from squibd.vm.models import VM_ISOLATION_MODES
from squibd.vmm.host import ZygoteHost
from squibd.vmm.statedir import vm_process_settings

from ._logging import setup_logging

__all__ = ["build_parser", "main"]

EXIT_OK: Final = 0
EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2

log = logging.getLogger("squibd")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's argument parser (command-line flags override the configuration file)."""
    parser = argparse.ArgumentParser(
        prog="squibd",
        description="Save and restore running KVM virtual machines; JSON-RPC over a Unix socket.",
        epilog="Offline tools: squibd --describe-snapshot PATH, squibd --rebase-snapshot ..., "
        "squibd --page-server ... (each has its own --help).",
    )
    parser.add_argument("--socket", default=None, help="listening socket path (default: "
                        f"$XDG_RUNTIME_DIR/squibd.sock, else {default_socket_path({})})")
    parser.add_argument("--config", help="TOML configuration file (default: none; every key "
                        "has a default)")  # fmt: skip
    parser.add_argument("--debug-api", action="store_true", default=None,
                        help="expose vm.read_memory and vm.write_memory (default: off)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                        help="log verbosity (default: info)")  # fmt: skip
    parser.add_argument("--state-dir", metavar="DIR",
                        help="private state directory: commit journals, shutdown saves, "
                        "VM-process records; one daemon at a time (created 0700; default: "
                        "$SQUIBD_STATE_DIR, else /var/lib/squibd/state for root, else "
                        "$XDG_STATE_HOME/squibd)")  # fmt: skip
    parser.add_argument("--log-format", choices=("text", "json"),
                        help="text, or one JSON object per line (default: text; under "
                        "journald each line carries its <priority>)")  # fmt: skip
    parser.add_argument("--on-shutdown", choices=ON_SHUTDOWN_MODES,
                        help="what SIGTERM does to the VMs (default: keep: VM processes run "
                        "on and the next daemon re-attaches them; with --vm-isolation "
                        "inprocess, keep behaves as stop)")  # fmt: skip
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help="serve Prometheus metrics over HTTP here (default: off)")
    parser.add_argument("--vm-isolation", choices=VM_ISOLATION_MODES, default=None,
                        help="one VM process per VM, or VMs inside the daemon "
                        "(default: process)")  # fmt: skip
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
    for key in ("log_format", "state_dir", "on_shutdown", "metrics_address",
                "vm_isolation"):
        value = getattr(args, key)
        if value is not None:
            server = attrs.evolve(server, **{key: value})
    return attrs.evolve(config, server=server)


def _recover(config: DaemonConfig) -> int | None:
    """Open and lock the state directory, then recover every journal in it.

    Returns the fd that holds the lock for the daemon's life; None if the
    directory is unusable or another daemon holds it. A journal that cannot
    be completed is quarantined and logged; the daemon starts anyway.
    """
    from squibd.snapshot.journal import recover_all
    from squibd.snapshot.statedir import StateDirError, configure_state_dir, lock_state_dir

    try:
        state = configure_state_dir(config.server.state_dir)
        assert state is not None
        # Before recovery: it must not roll back the saves of a daemon still running.
        lock_fd = lock_state_dir(state)
        outcomes = recover_all(state)
    except StateDirError as exc:
        print(f"squibd: {exc}", file=sys.stderr)
        return None
    except SnapshotError as exc:  # Io: the journal folder itself is unreadable
        os.close(lock_fd)
        print(f"squibd: recovery failed in {config.server.state_dir}: {exc}", file=sys.stderr)
        return None
    log.info("state directory %s: %d journal(s) recovered", state.path,
             sum(outcome != "busy" for outcome in outcomes.values()))  # fmt: skip
    return lock_fd


def main(argv: list[str] | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        config = _apply_overrides(load_config(args.config), args)
    except ConfigError as exc:
        print(f"squibd: {exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(config.server.log_level, config.server.log_format)
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
    set_daemon_roots(config.snapshot.allowed_roots)
    state_lock = _recover(config)
    if state_lock is None:
        for sock in sockets:
            sock.close()
        for path in owned:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return EXIT_FAILURE
    settings = vm_process_settings(config.server)
    if settings["vm_isolation"] == "process":
        # First, while the daemon has one thread: then the zygote can start out of
        # reach of a tracer that follows the daemon (``squibd.vmm.untraced``).
        settings["zygote"] = _start_zygote()
    api = ApiContext(
        debug_api=config.server.debug_api,
        allowed_roots=config.snapshot.allowed_roots,
        quiesce_timeout_s=config.snapshot.quiesce_timeout_s,
        limits=attrs.asdict(config.limits),
        stores=config.stores,
        state_dir=config.server.state_dir,
        **settings,
    )
    if config.server.on_shutdown == "save":
        from squibd.lifecycle import save_all

        api.shutdown_hook = save_all
    server = Server(config, api, sockets, owned, Notifier.from_environ())
    metrics = _start_metrics(config, api, server)
    if metrics is False:  # could not listen: a configuration error

        for sock in sockets:
            sock.close()
        return EXIT_FAILURE
    # Everything imported so far lives as long as the daemon: keep it out of the
    # collector's generations so full collections stay short (lower tail latency).
    gc.freeze()
    try:
        trio.run(_serve, api, server)
    finally:
        for sock in sockets:
            sock.close()
        if isinstance(metrics, Metrics):
            metrics.close()
        os.close(state_lock)
    return EXIT_OK


def _start_zygote() -> ZygoteHost | None:
    """The warm zygote, started now; None if it cannot start (the runtime retries later)."""
    zygote = ZygoteHost()
    try:
        zygote.ensure_started()
    except OSError as exc:
        log.warning("cannot start the VM-process zygote now: %s", exc)
        return None
    return zygote


def _start_metrics(config: DaemonConfig, api: ApiContext, server: Server) -> Metrics | bool | None:
    address = config.server.metrics_address
    if address is None:
        return None
    metrics = Metrics()
    metrics.watch_connections(lambda: server.connection_count)
    try:
        host, port = metrics.serve(address)
    except OSError as exc:
        print(f"squibd: cannot serve metrics on {address}: {exc.strerror or exc}",
              file=sys.stderr)  # fmt: skip
        return False
    api.metrics = metrics
    log.info("metrics on http://%s:%d/metrics", host, port)
    return metrics


async def _serve(api: ApiContext, server: Server) -> None:
    """Restore the VMs saved at the last shutdown, then serve."""
    from squibd.lifecycle import restore_saved

    await api.startup()  # re-attach first: then restore what on_shutdown = "save" left
    restored = await restore_saved(api)
    if restored:
        log.info("restored %d VM(s) saved at the last shutdown: %s", len(restored),
                 ", ".join(restored))  # fmt: skip
    await server.serve()


if __name__ == "__main__":
    sys.exit(main())
