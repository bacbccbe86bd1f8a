"""``squibctl``: drive a running squibd from the command line.

Subcommands mirror the JSON-RPC methods (``squibctl vm create ...``,
``squibctl snapshot create ...``). The socket comes from ``--socket``, else
``$SQUIBD_SOCKET``, else the daemon's default. Output is for humans unless
``--json`` is given (then: the method's result, as JSON, on stdout).
``snapshot create/load/rebase`` show a progress bar on a terminal (or with
``--progress``); Ctrl-C during them asks the daemon to cancel, and the
daemon rolls back.

Exit codes: 0 success, 1 error (the daemon's fault_message on stderr),
2 usage error.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, Final

import outcome
import trio
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from squibd.config import default_socket_path

from ._client import CallFailed, DaemonUnreachable, RpcClient, open_client
from ._ctl_store import STORE_LONG, add_store_parser, store_request
from ._render import render

__all__ = ["build_parser", "main"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
SOCKET_ENV: Final = "SQUIBD_SOCKET"


def _guest_param(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=INTEGER, got {text!r}")
    return key, int(value)


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="squibctl", description="Drive a running squibd.")
    p.add_argument("--socket", help=f"daemon socket (default: ${SOCKET_ENV}, else "
                   f"{default_socket_path()})")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print results as JSON")
    sub = p.add_subparsers(dest="area", required=True, metavar="{status,vm,snapshot,store,call}")

    sub.add_parser("status", help="daemon.status")

    vm = sub.add_parser("vm", help="VM lifecycle").add_subparsers(dest="verb", required=True)
    create = vm.add_parser("create", help="vm.create")
    create.add_argument("vm_id")
    create.add_argument("--vcpus", type=int, default=1, dest="vcpu_count")
    create.add_argument("--mem-mib", type=int, default=128, dest="mem_size_mib")
    create.add_argument("--track-dirty-pages", action="store_true")
    create.add_argument("--program", choices=("counter", "memwriter"), default="counter")
    create.add_argument("--guest-param", type=_guest_param, action="append", default=[],
                        metavar="NAME=INT", help="guest parameter (repeatable)")  # fmt: skip
    create.add_argument("--api-socket", metavar="PATH",
                        help="also serve Firecracker's REST API for the VM on PATH")  # fmt: skip
    create.add_argument("--memory-layout", choices=("squibd", "firecracker"), default=None,
                        help="guest RAM layout (default: squibd)")  # fmt: skip
    for verb in ("start", "pause", "resume", "destroy", "describe"):
        vm.add_parser(verb, help=f"vm.{verb}").add_argument("vm_id")
    vm.add_parser("list", help="vm.list")
    read = vm.add_parser("read-memory", help="vm.read_memory (squibd --debug-api)")
    read.add_argument("vm_id")
    read.add_argument("guest_addr", type=_int)
    read.add_argument("length", type=_int)
    write = vm.add_parser("write-memory", help="vm.write_memory (squibd --debug-api)")
    write.add_argument("vm_id")
    write.add_argument("guest_addr", type=_int)
    write.add_argument("data_hex", help="bytes to write, in hex")

    snap = sub.add_parser("snapshot", help="snapshots").add_subparsers(dest="verb", required=True)
    screate = snap.add_parser("create", help="snapshot.create")
    screate.add_argument("vm_id")
    screate.add_argument("--snapshot-path", required=True)
    screate.add_argument("--mem-file-path", required=True)
    screate.add_argument("--type", choices=("Full", "Diff"), default="Full", dest="snapshot_type")
    screate.add_argument("--live", action="store_true", help="pre-copy while the guest runs")
    load = snap.add_parser("load", help="snapshot.load")
    load.add_argument("vm_id")
    load.add_argument("--snapshot-path", required=True)
    backend = load.add_mutually_exclusive_group(required=True)
    backend.add_argument("--mem-file-path", help="File backend: the memory file")
    backend.add_argument("--uffd-socket", help="Uffd backend: the page server's socket")
    load.add_argument("--track-dirty-pages", action="store_true")
    load.add_argument("--resume", action="store_true", dest="resume_vm")
    describe = snap.add_parser("describe", help="snapshot.describe")
    describe.add_argument("snapshot_path")
    describe.add_argument("--mem-file-path")
    describe.add_argument("--verify", choices=("none", "size", "full"), default="none")
    rebase = snap.add_parser("rebase", help="snapshot.rebase")
    rebase.add_argument("--base", required=True, dest="base_snapshot_path")
    rebase.add_argument("--diff", required=True, dest="diff_snapshot_path")
    rebase.add_argument("--output", required=True, dest="output_snapshot_path")
    rebase.add_argument("--output-mem-file-path")
    for sp in (screate, load, rebase):
        sp.add_argument("--progress", action="store_true", default=None,
                        help="show a progress bar even when stderr is not a terminal")  # fmt: skip

    add_store_parser(sub)
    raw = sub.add_parser("call", help="call any method with JSON params")
    raw.add_argument("method")
    raw.add_argument("params", nargs="?", default="{}", help="params as a JSON object")
    return p


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The (method, params) a parsed command line asks for.

    Raises:
        ValueError: params that cannot be built (bad JSON for ``call``).
    """
    area, verb = args.area, getattr(args, "verb", None)
    if area == "status":
        return "daemon.status", {}
    if area == "store":
        return store_request(args)
    if area == "call":
        params = json.loads(args.params)
        if not isinstance(params, dict):
            raise ValueError("params must be a JSON object")
        return args.method, params
    if area == "vm":
        if verb == "create":
            guest: dict[str, Any] = {"program": args.program, **dict(args.guest_param)}
            create_params: dict[str, Any] = {
                "vm_id": args.vm_id, "vcpu_count": args.vcpu_count,
                "mem_size_mib": args.mem_size_mib,
                "track_dirty_pages": args.track_dirty_pages, "guest": guest,
            }  # fmt: skip
            if args.api_socket is not None:
                create_params["api_socket"] = os.path.abspath(args.api_socket)
            if args.memory_layout is not None:
                create_params["memory_layout"] = args.memory_layout
            return "vm.create", create_params
        if verb == "list":
            return "vm.list", {}
        if verb == "read-memory":
            return "vm.read_memory", {
                "vm_id": args.vm_id,
                "guest_addr": args.guest_addr,
                "length": args.length,
            }
        if verb == "write-memory":
            data = base64.b64encode(bytes.fromhex(args.data_hex)).decode()
            return "vm.write_memory", {
                "vm_id": args.vm_id,
                "guest_addr": args.guest_addr,
                "data_base64": data,
            }
        return f"vm.{verb}", {"vm_id": args.vm_id}
    if verb == "create":
        return "snapshot.create", {
            "vm_id": args.vm_id, "snapshot_type": args.snapshot_type,
            "snapshot_path": args.snapshot_path, "mem_file_path": args.mem_file_path,
            "live": args.live,
        }  # fmt: skip
    if verb == "load":
        params = {
            "vm_id": args.vm_id, "snapshot_path": args.snapshot_path,
            "track_dirty_pages": args.track_dirty_pages, "resume_vm": args.resume_vm,
        }  # fmt: skip
        if args.uffd_socket is not None:
            params["mem_backend"] = {"backend_type": "Uffd", "backend_path": args.uffd_socket}
        else:
            params["mem_backend"] = {"backend_type": "File", "backend_path": args.mem_file_path}
        return "snapshot.load", params
    if verb == "describe":
        params = {"snapshot_path": args.snapshot_path, "verify": args.verify}
        if args.mem_file_path is not None:
            params["mem_file_path"] = args.mem_file_path
        return "snapshot.describe", params
    params = {
        "base_snapshot_path": args.base_snapshot_path,
        "diff_snapshot_path": args.diff_snapshot_path,
        "output_snapshot_path": args.output_snapshot_path,
    }
    if args.output_mem_file_path is not None:
        params["output_mem_file_path"] = args.output_mem_file_path
    return "snapshot.rebase", params


class _Bar:
    """A rich progress bar fed by ``$/progress`` (phase, done, total)."""

    def __init__(self, console: Console, label: str) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
            TextColumn("{task.fields[phase]}"), TimeElapsedColumn(),
            console=console, transient=False,
        )  # fmt: skip
        self._task: TaskID = self._progress.add_task(label, total=None, phase="")

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, phase: str, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=max(total, 1), phase=phase)


async def _run_call(
    client: RpcClient, method: str, params: dict[str, Any], progress: Callable[..., None] | None
) -> Any:
    """Call, turning the first Ctrl-C into ``$/cancelRequest`` (the second aborts)."""
    sent: list[int] = []
    result: list[outcome.Outcome[Any]] = []
    async with trio.open_nursery() as nursery:

        async def call() -> None:
            try:
                result.append(
                    await outcome.acapture(
                        client.call, method, params, on_progress=progress, on_sent=sent.append
                    )
                )
            finally:
                nursery.cancel_scope.cancel()

        async def watch_interrupt() -> None:
            with trio.open_signal_receiver(signal.SIGINT) as signals:
                async for _ in signals:
                    if not sent:
                        result.append(outcome.Error(KeyboardInterrupt()))
                        nursery.cancel_scope.cancel()
                        return
                    print("squibctl: cancelling (Ctrl-C again to abort)", file=sys.stderr)
                    await client.cancel(sent[0])
                    break
                async for _ in signals:
                    result.append(outcome.Error(KeyboardInterrupt()))
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(call)
        nursery.start_soon(watch_interrupt)
    return result[0].unwrap()


_LONG: Final = frozenset({"snapshot.create", "snapshot.load", "snapshot.rebase"}) | STORE_LONG


async def _amain(args: argparse.Namespace, method: str, params: dict[str, Any]) -> Any:
    path = args.socket or os.environ.get(SOCKET_ENV) or default_socket_path()
    forced = getattr(args, "progress", None)
    show = forced if forced is not None else sys.stderr.isatty() and not args.json
    async with open_client(path) as client:
        if method in _LONG and show:
            console = Console(stderr=True, force_terminal=bool(args.progress) or None)
            with _Bar(console, method) as bar:
                return await _run_call(client, method, params, bar.update)
        return await _run_call(client, method, params, None)


def _leaf(exc: BaseException) -> BaseException:
    # trio nurseries wrap errors in groups; a lone error is what the user cares about.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    """Run squibctl; returns the exit code (argparse exits 2 itself on usage errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        method, params = request_of(args)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"squibctl: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        try:
            result = trio.run(_amain, args, method, params)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
    except CallFailed as exc:
        if args.json:
            print(json.dumps({"error": exc.error.to_json()}), file=sys.stderr)
        else:
            kind = exc.error.kind
            prefix = f"{kind}: " if kind else ""
            print(f"squibctl: {prefix}{exc.error.fault_message}", file=sys.stderr)
        return EXIT_ERROR
    except DaemonUnreachable as exc:
        print(f"squibctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("squibctl: interrupted", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(method, result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
