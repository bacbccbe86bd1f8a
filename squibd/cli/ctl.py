"""``squibctl``: drive a running squibd from the command line (built on :mod:`squibd.client`).

Subcommands mirror the JSON-RPC methods (``squibctl vm create ...``,
``squibctl snapshot create ...``): the command of each method, and its help
line (the method's summary), come from :mod:`squibd.cli._commands`. The
socket comes from ``--socket``, else ``$SQUIBD_SOCKET``, else the daemon's
default. Output is for humans unless ``--json`` is given anywhere on the
command line (then: the method's result, as JSON, on stdout). Relative paths
are resolved against the working directory before they are sent. Long-running
methods (``snapshot create/load/rebase``) show one progress bar (bytes, rate,
ETA) on a terminal, or with ``--progress``;
Ctrl-C during them asks the daemon to cancel, and the daemon rolls back.

Exit codes: 0 success, 1 error (the daemon's fault_message on stderr; also a
``snapshot describe`` whose snapshot is damaged or fails verification),
2 usage error.

Extra subcommand groups (``squibctl store ...``) live in their own modules,
listed in :data:`EXTENSION_MODULES`; each provides ``AREA``,
``add_parser(subparsers)`` and ``request_of(args) -> (method, params)``, and
may provide ``render(method, result) -> str`` and ``LONG`` (methods that get a
progress bar).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib
import json
import os
import signal
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

import outcome
import trio
from rich.console import Console

from squibd import __version__
from squibd.client import AsyncClient, DaemonUnreachable, SquibdError
from squibd.client._common import SOCKET_ENV
from squibd.config import default_socket_path
from squibd.protocol_files import DOCUMENTS, protocol_document
from squibd.snapshot.models import DEFAULT_PROGRAM, PROGRAM_NAMES

from ._commands import command_of, help_of, long_running_methods, method_of
from ._progress import Bar
from ._render import render

__all__ = ["EXTENSION_MODULES", "build_parser", "main"]

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2

#: Modules adding subcommand groups; a module that is not installed is skipped.
EXTENSION_MODULES: list[str] = ["squibd.cli._ctl_store"]

#: What to do about an error of a given kind (printed after the daemon's message).
_HINTS: Final = {
    "DiffNotAllowed": "create or load the VM with --track-dirty-pages to take Diff snapshots",
    "NoParentCheckpoint": "take a Full snapshot of this VM first; Diffs are relative to it",
    "HasDependents": "delete the Diff(s) first, or pass --force",
    "UnknownVm": "list the VMs with: squibctl vm list",
    "AtomicCommitCrossFs": "put the snapshot and memory file on the same filesystem",
    "NotAllowed": "paths must lie inside [snapshot] allowed_roots of squibd's configuration",
}


def _extensions() -> list[ModuleType]:
    out = []
    for name in EXTENSION_MODULES:
        try:
            out.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return out


def _guest_param(text: str) -> tuple[str, int]:
    key, sep, value = text.partition("=")
    if not sep or not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected NAME=INTEGER, got {text!r}")
    return key, int(value)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _path(text: str) -> str:
    """Resolve a relative path against squibctl's working directory (the daemon's differs)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return os.path.abspath(text)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, but not "(default: None)" or "(default: False)"."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, [], argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    p = argparse.ArgumentParser(prog="squibctl", description="Drive a running squibd.",
                                formatter_class=_Formatter)  # fmt: skip
    p.add_argument("--socket", help=f"daemon socket (default: ${SOCKET_ENV}, else "
                   f"{default_socket_path()})")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="print results as JSON (accepted anywhere on the command line)")
    p.add_argument("--version", action="version", version=f"squibctl {__version__}")
    sub = p.add_subparsers(dest="area", required=True, metavar="COMMAND")

    def parser(parent: Any, name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        made: argparse.ArgumentParser = parent.add_parser(
            name, help=help, description=help, formatter_class=_Formatter, **kwargs
        )
        return made

    def command(parent: Any, method: str, note: str = "") -> argparse.ArgumentParser:
        """The subcommand of ``method``: its name and help derived from the method table."""
        return parser(parent, command_of(method)[-1], help_of(method, note))

    command(sub, "daemon.status")

    vm = parser(sub, "vm", "VM lifecycle").add_subparsers(dest="verb", required=True,
                                                          metavar="VERB")  # fmt: skip
    create = command(vm, "vm.create")
    create.add_argument("vm_id")
    create.add_argument("--vcpus", type=int, default=1, dest="vcpu_count", help="vCPUs")
    create.add_argument("--mem-mib", "--mem-size-mib", type=int, default=128,
                        dest="mem_size_mib", help="guest RAM in MiB")  # fmt: skip
    create.add_argument("--track-dirty-pages", action="store_true",
                        help="track dirty pages (needed for Diff snapshots)")  # fmt: skip
    create.add_argument("--program", choices=PROGRAM_NAMES, default=DEFAULT_PROGRAM,
                        help="built-in guest program")  # fmt: skip
    create.add_argument("--guest-param", type=_guest_param, action="append", default=[],
                        metavar="NAME=INT", help="guest parameter (repeatable)")  # fmt: skip
    create.add_argument("--api-socket", metavar="PATH", type=_path,
                        help="also serve Firecracker's REST API for the VM on PATH")  # fmt: skip
    create.add_argument("--memory-layout", choices=("squibd", "firecracker"), default=None,
                        help="guest RAM layout (default: squibd)")  # fmt: skip
    for verb in ("start", "pause", "resume", "destroy", "describe"):
        command(vm, f"vm.{verb}").add_argument("vm_id")
    command(vm, "vm.list")
    read = command(vm, "vm.read_memory", "needs squibd --debug-api")
    read.add_argument("vm_id")
    read.add_argument("guest_addr", type=_int)
    read.add_argument("length", type=_int)
    write = command(vm, "vm.write_memory", "needs squibd --debug-api")
    write.add_argument("vm_id")
    write.add_argument("guest_addr", type=_int)
    write.add_argument("data_hex", help="bytes to write, in hex")

    snap = parser(sub, "snapshot", "snapshots").add_subparsers(dest="verb", required=True,
                                                               metavar="VERB")  # fmt: skip
    screate = command(snap, "snapshot.create")
    screate.add_argument("vm_id")
    screate.add_argument("--snapshot-path", required=True, type=_path, help="the state file")
    screate.add_argument("--mem-file-path", required=True, type=_path, help="the memory file")
    screate.add_argument("--type", "--snapshot-type", choices=("Full", "Diff"), default="Full",
                         dest="snapshot_type", help="snapshot type")  # fmt: skip
    screate.add_argument("--live", action="store_true", help="pre-copy while the guest runs")
    screate.add_argument("--label", type=_label, action="append", default=[],
                         metavar="KEY=VALUE", help="label stored in the state file (repeatable)")
    load = command(snap, "snapshot.load")
    load.add_argument("vm_id")
    load.add_argument("--snapshot-path", required=True, type=_path, help="the state file")
    backend = load.add_mutually_exclusive_group(required=True)
    backend.add_argument("--mem-file-path", type=_path, help="File backend: the memory file")
    backend.add_argument("--uffd-socket", type=_path, help="Uffd backend: the page server socket")
    load.add_argument("--track-dirty-pages", action="store_true",
                      help="track dirty pages (needed for Diff snapshots of the loaded VM)")
    load.add_argument("--resume", action="store_true", dest="resume_vm", help="run it after")
    describe = command(snap, "snapshot.describe", "exit 1 when damaged")
    describe.add_argument("snapshot_path", type=_path)
    describe.add_argument("--mem-file-path", "--memory-file", type=_path,
                          help="its memory file (default: beside it)")  # fmt: skip
    describe.add_argument("--verify", choices=("none", "size", "full"), default="none",
                          help="check the memory file: size (and pair) or full digests")
    rebase = command(snap, "snapshot.rebase")
    rebase.add_argument("--base", "--base-snapshot-path", required=True, type=_path,
                        dest="base_snapshot_path", help="the Full state file")  # fmt: skip
    rebase.add_argument("--diff", "--diff-snapshot-path", required=True, type=_path,
                        action="append", dest="diff_snapshot_paths", metavar="DIFF.snap",
                        help="a Diff state file; repeat in checkpoint order")  # fmt: skip
    rebase.add_argument("--output", "--output-snapshot-path", required=True, type=_path,
                        dest="output_snapshot_path", help="the merged state file")
    rebase.add_argument("--output-mem-file-path", "--output-memory-file", type=_path,
                        dest="output_mem_file_path",
                        help="the merged memory file (default: beside --output)")
    for sp in (screate, load, rebase):
        sp.add_argument("--progress", action="store_true", default=None,
                        help="show a progress bar even when stderr is not a terminal")  # fmt: skip
    slist = command(snap, "snapshot.list")
    slist.add_argument("--root", type=_path, help="only this directory")
    slist.add_argument("--vm-id", help="only pairs saved from this VM")
    slist.add_argument("--label", help="KEY=VALUE, or KEY: only pairs with that label")
    sdelete = command(snap, "snapshot.delete")
    sdelete.add_argument("snapshot_path", type=_path)
    sdelete.add_argument("--force", action="store_true",
                         help="delete even when a Diff depends on it")  # fmt: skip

    raw = parser(sub, "call", "call any method with JSON params")
    raw.add_argument("method")
    raw.add_argument("params", nargs="?", default="{}", help="params as a JSON object")

    completion = parser(sub, "completion", "print a shell completion script")
    completion.add_argument("shell", choices=("bash", "zsh"))
    protocol = parser(sub, "protocol", "print a protocol document shipped with squibd")
    protocol.add_argument("document", choices=DOCUMENTS)

    for ext in _extensions():
        ext.add_parser(sub)
    return p


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The (method, params) a parsed command line asks for.

    Raises:
        ValueError: params that cannot be built (bad JSON for ``call``).
    """
    area, verb = args.area, str(getattr(args, "verb", ""))
    for ext in _extensions():
        if area == ext.AREA:
            method, params = ext.request_of(args)
            return method, params
    if area == "status":
        return method_of((area,)), {}
    if area == "call":
        params = json.loads(args.params)
        if not isinstance(params, dict):
            raise ValueError("params must be a JSON object")
        return args.method, params
    if area == "vm":
        return _vm_request(args, verb)
    return _snapshot_request(args, verb)


def _vm_request(args: argparse.Namespace, verb: str) -> tuple[str, dict[str, Any]]:
    if verb == "create":
        guest: dict[str, Any] = {"program": args.program, **dict(args.guest_param)}
        params: dict[str, Any] = {
            "vm_id": args.vm_id, "vcpu_count": args.vcpu_count,
            "mem_size_mib": args.mem_size_mib,
            "track_dirty_pages": args.track_dirty_pages, "guest": guest,
        }  # fmt: skip
        if args.api_socket is not None:
            params["api_socket"] = args.api_socket
        if args.memory_layout is not None:
            params["memory_layout"] = args.memory_layout
        return method_of(("vm", verb)), params
    if verb == "list":
        return method_of(("vm", verb)), {}
    if verb == "read-memory":
        return method_of(("vm", verb)), {
            "vm_id": args.vm_id, "guest_addr": args.guest_addr, "length": args.length,
        }  # fmt: skip
    if verb == "write-memory":
        data = base64.b64encode(bytes.fromhex(args.data_hex)).decode()
        return method_of(("vm", verb)), {
            "vm_id": args.vm_id, "guest_addr": args.guest_addr, "data_base64": data,
        }  # fmt: skip
    return method_of(("vm", verb)), {"vm_id": args.vm_id}


def _snapshot_request(args: argparse.Namespace, verb: str) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any]
    if verb == "create":
        params = {
            "vm_id": args.vm_id, "snapshot_type": args.snapshot_type,
            "snapshot_path": args.snapshot_path, "mem_file_path": args.mem_file_path,
            "live": args.live,
        }  # fmt: skip
        if args.label:
            params["labels"] = dict(args.label)
        return method_of(("snapshot", verb)), params
    if verb == "load":
        params = {
            "vm_id": args.vm_id, "snapshot_path": args.snapshot_path,
            "track_dirty_pages": args.track_dirty_pages, "resume_vm": args.resume_vm,
        }  # fmt: skip
        if args.uffd_socket is not None:
            params["mem_backend"] = {"backend_type": "Uffd", "backend_path": args.uffd_socket}
        else:
            params["mem_backend"] = {"backend_type": "File", "backend_path": args.mem_file_path}
        return method_of(("snapshot", verb)), params
    if verb == "describe":
        params = {"snapshot_path": args.snapshot_path, "verify": args.verify}
        if args.mem_file_path is not None:
            params["mem_file_path"] = args.mem_file_path
        return method_of(("snapshot", verb)), params
    if verb == "list":
        params = {k: v for k in ("root", "vm_id", "label") if (v := getattr(args, k)) is not None}
        return method_of(("snapshot", verb)), params
    if verb == "delete":
        params = {"snapshot_path": args.snapshot_path, "force": args.force}
        return method_of(("snapshot", verb)), params
    params = {
        "base_snapshot_path": args.base_snapshot_path,
        "output_snapshot_path": args.output_snapshot_path,
    }
    diffs = args.diff_snapshot_paths
    if len(diffs) == 1:
        params["diff_snapshot_path"] = diffs[0]
    else:
        params["diff_snapshot_paths"] = diffs
    if args.output_mem_file_path is not None:
        params["output_mem_file_path"] = args.output_mem_file_path
    return method_of(("snapshot", verb)), params


async def _run_call(
    client: Any, method: str, params: dict[str, Any], progress: Callable[..., None] | None
) -> Any:
    """Call, turning the first Ctrl-C into ``$/cancelRequest`` (the second aborts).

    ``client`` is an :class:`~squibd.client.AsyncClient` (or anything with its
    ``call(..., on_progress=, on_sent=)`` and ``cancel(request_id)``).
    """
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


def socket_path(args: argparse.Namespace) -> str:
    """``--socket``, else ``$SQUIBD_SOCKET``, else the daemon's default."""
    return str(args.socket or os.environ.get(SOCKET_ENV) or default_socket_path())


async def _amain(args: argparse.Namespace, method: str, params: dict[str, Any]) -> Any:
    forced = getattr(args, "progress", None)
    show = forced if forced is not None else sys.stderr.isatty() and not args.json
    async with AsyncClient(socket_path(args)) as client:
        long_running = long_running_methods().union(
            *(getattr(ext, "LONG", ()) for ext in _extensions())
        )
        if method in long_running and show:
            console = Console(stderr=True, force_terminal=bool(forced) or None)
            with Bar(console, method) as bar:
                return await _run_call(client, method, params, bar.update)
        return await _run_call(client, method, params, None)


def _leaf(exc: BaseException) -> BaseException:
    # trio nurseries wrap errors in groups; a lone error is what the user cares about.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _extract_json_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``--json`` anywhere (before ``call``'s JSON params) -> moved to the front."""
    out: list[str] = []
    found = False
    for index, arg in enumerate(argv):
        if arg == "--":
            out += argv[index:]
            break
        if arg == "--json":
            found = True
        else:
            out.append(arg)
    return out, found


def _print_error(args: argparse.Namespace, kind: str | None, message: str,
                 params: dict[str, Any], error_json: dict[str, Any]) -> None:  # fmt: skip
    if args.json:
        print(json.dumps({"error": error_json}), file=sys.stderr)
        return
    prefix = f"{kind}: " if kind else ""
    print(f"squibctl: {prefix}{message}", file=sys.stderr)
    paths = {k: v for k, v in params.items() if k.endswith("_path") and isinstance(v, str)}
    if paths and not any(p in message for p in paths.values()):
        named = ", ".join(f"{k}={v}" for k, v in paths.items())
        print(f"squibctl: (the call was about {named})", file=sys.stderr)
    hint = _HINTS.get(kind or "")
    if hint:
        print(f"squibctl: hint: {hint}", file=sys.stderr)


def _render(method: str, result: Any) -> str:
    for ext in _extensions():
        ext_render = getattr(ext, "render", None)
        if ext_render is not None and method.startswith(f"{ext.AREA}."):
            text: str = ext_render(method, result)
            return text
    return render(method, result)


def _completion(parser: argparse.ArgumentParser, shell: str) -> str:
    import shtab

    script: str = shtab.complete(parser, shell=shell)
    return script


def main(argv: list[str] | None = None) -> int:
    """Run squibctl; returns the exit code (argparse exits 2 itself on usage errors)."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `squibctl ... | head`: the reader left; no traceback
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    raw, as_json = _extract_json_flag(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(raw)
    args.json = args.json or as_json
    if args.area == "completion":
        print(_completion(parser, args.shell))
        return EXIT_OK
    if args.area == "protocol":
        sys.stdout.write(protocol_document(args.document))
        return EXIT_OK
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
    except SquibdError as exc:
        _print_error(args, exc.kind, exc.fault_message, params, exc.to_json())
        return EXIT_ERROR
    except DaemonUnreachable as exc:
        print(f"squibctl: {exc}", file=sys.stderr)
        print("squibctl: hint: is squibd running (systemctl status squibd)? "
              f"Pass --socket or set ${SOCKET_ENV} if it listens elsewhere.",
              file=sys.stderr)  # fmt: skip
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("squibctl: interrupted", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_render(method, result))
    if method == "snapshot.describe" and isinstance(result, dict) and not result.get("ok", True):
        return EXIT_ERROR  # damaged, foreign, or verification failed: scripts must see it
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
