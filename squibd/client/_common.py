"""What the blocking and the async client share: errors, framing, the typed methods."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, Final, Generic, Literal, TypeVar

from ..snapshot.models import DEFAULT_PROGRAM

__all__ = [
    "CANCELLED",
    "DaemonUnreachable",
    "ProgressCallback",
    "SquibdError",
    "TypedMethods",
    "default_socket_path",
]

#: ``$/progress`` callback: ``(phase, done, total)``; bytes for saves, loads and rebases.
ProgressCallback = Callable[[str, int, int], None]

#: JSON-RPC code of a call cancelled by ``$/cancelRequest`` (it rolled back).
CANCELLED: Final = -32800
PROGRESS: Final = "$/progress"
CANCEL_REQUEST: Final = "$/cancelRequest"
JSONRPC: Final = "2.0"
SOCKET_ENV: Final = "SQUIBD_SOCKET"


def default_socket_path() -> str:
    """``$SQUIBD_SOCKET``, else the daemon's default (``$XDG_RUNTIME_DIR/squibd.sock``...)."""
    from squibd.config import default_socket_path as daemon_default

    return os.environ.get(SOCKET_ENV) or daemon_default()


class SquibdError(Exception):
    """The daemon answered a call with a JSON-RPC error.

    Attributes:
        code: the JSON-RPC error code (-32001 snapshot error, -32002 unknown VM, ...).
        kind: ``data.kind`` (``"InvalidPath"``, ``"UnknownVm"``...), ``None`` for protocol errors.
        fault_message: ``data.fault_message``, else the error's ``message``.
        data: the whole ``data`` member (``None`` when absent).
    """

    def __init__(
        self, code: int, message: str, data: Any = None, *, method: str | None = None
    ) -> None:
        self.code = code
        self.message = message
        self.data = data
        self.method = method
        kind = data.get("kind") if isinstance(data, dict) else None
        fault = data.get("fault_message") if isinstance(data, dict) else None
        self.kind: str | None = kind if isinstance(kind, str) else None
        self.fault_message: str = fault if isinstance(fault, str) else message
        super().__init__(self.fault_message)

    @classmethod
    def from_json(cls, error: Any, method: str | None = None) -> SquibdError:
        """From the ``error`` member of a response."""
        if not isinstance(error, dict):
            return cls(-32603, f"malformed error object: {error!r}", method=method)
        return cls(
            int(error.get("code", -32603)),
            str(error.get("message", "")),
            error.get("data"),
            method=method,
        )

    def to_json(self) -> dict[str, Any]:
        """The error object as the daemon sent it."""
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            out["data"] = self.data
        return out

    @property
    def cancelled(self) -> bool:
        """True when the call was cancelled and rolled back (-32800)."""
        return self.code == CANCELLED


class DaemonUnreachable(ConnectionError):
    """No daemon answers on the socket, or it closed the connection before answering."""


def encode(message: dict[str, Any]) -> bytes:
    """One JSON text, newline-terminated (squibd's framing)."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def request(request_id: int, method: str, params: dict[str, Any] | None) -> bytes:
    """A request line."""
    message: dict[str, Any] = {"jsonrpc": JSONRPC, "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return encode(message)


def notification(method: str, params: dict[str, Any]) -> bytes:
    """A notification line."""
    return encode({"jsonrpc": JSONRPC, "method": method, "params": params})


def messages(line: bytes) -> list[dict[str, Any]]:
    """The messages of one received line (a batch answer is a list)."""
    decoded = json.loads(line)
    items = decoded if isinstance(decoded, list) else [decoded]
    return [item for item in items if isinstance(item, dict)]


def progress_args(params: Any) -> tuple[Any, str, int, int] | None:
    """``(token, phase, done, total)`` of a ``$/progress`` notification's params."""
    if not isinstance(params, dict):
        return None
    try:
        return params.get("token"), str(params.get("phase")), int(params["done"]), int(
            params["total"]
        )
    except (KeyError, TypeError, ValueError):
        return None


def _drop_none(**kwargs: Any) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if v is not None}


_R = TypeVar("_R")

Verify = Literal["none", "size", "full"]


class TypedMethods(Generic[_R]):
    """One method per JSON-RPC method (checked against the method table by a test).

    Each returns the method's result as decoded JSON (a dict); the async client's
    return awaitables. ``on_progress`` receives ``(phase, done, total)``.
    """

    def _invoke(
        self, method: str, params: dict[str, Any], on_progress: ProgressCallback | None = None
    ) -> _R:
        raise NotImplementedError

    def daemon_status(self) -> _R:
        """``daemon.status``: version, pid, uptime, VM count, KVM availability."""
        return self._invoke("daemon.status", {})

    def vm_create(
        self,
        vm_id: str,
        *,
        vcpu_count: int = 1,
        mem_size_mib: int = 128,
        guest: dict[str, Any] | None = None,
        track_dirty_pages: bool = False,
        api_socket: str | None = None,
        memory_layout: str | None = None,
    ) -> _R:
        """``vm.create``: a NotStarted VM running a built-in guest program.

        ``api_socket``: also serve Firecracker's REST API for it there;
        ``memory_layout``: ``squibd`` (default) or ``firecracker``.
        """
        params: dict[str, Any] = {
            "vm_id": vm_id, "vcpu_count": vcpu_count, "mem_size_mib": mem_size_mib,
            "guest": guest or {"program": DEFAULT_PROGRAM}, "track_dirty_pages": track_dirty_pages,
        }  # fmt: skip
        params.update(_drop_none(api_socket=api_socket, memory_layout=memory_layout))
        return self._invoke("vm.create", params)

    def vm_start(self, vm_id: str) -> _R:
        """``vm.start``."""
        return self._invoke("vm.start", {"vm_id": vm_id})

    def vm_pause(self, vm_id: str) -> _R:
        """``vm.pause``."""
        return self._invoke("vm.pause", {"vm_id": vm_id})

    def vm_resume(self, vm_id: str) -> _R:
        """``vm.resume``."""
        return self._invoke("vm.resume", {"vm_id": vm_id})

    def vm_describe(self, vm_id: str) -> _R:
        """``vm.describe``."""
        return self._invoke("vm.describe", {"vm_id": vm_id})

    def vm_list(self) -> _R:
        """``vm.list``."""
        return self._invoke("vm.list", {})

    def vm_destroy(self, vm_id: str) -> _R:
        """``vm.destroy``."""
        return self._invoke("vm.destroy", {"vm_id": vm_id})

    def snapshot_create(
        self,
        vm_id: str,
        snapshot_path: str,
        mem_file_path: str,
        *,
        snapshot_type: Literal["Full", "Diff"] = "Full",
        labels: dict[str, str] | None = None,
        live: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> _R:
        """``snapshot.create``: save a VM as a Full or Diff pair."""
        params = _drop_none(
            vm_id=vm_id, snapshot_path=snapshot_path, mem_file_path=mem_file_path,
            snapshot_type=snapshot_type, labels=labels, live=live,
        )  # fmt: skip
        return self._invoke("snapshot.create", params, on_progress)

    def snapshot_load(
        self,
        vm_id: str,
        snapshot_path: str,
        *,
        mem_file_path: str | None = None,
        mem_backend: dict[str, str] | None = None,
        track_dirty_pages: bool = False,
        resume_vm: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> _R:
        """``snapshot.load``: give ``mem_file_path`` or ``mem_backend``."""
        params = _drop_none(
            vm_id=vm_id, snapshot_path=snapshot_path, mem_file_path=mem_file_path,
            mem_backend=mem_backend, track_dirty_pages=track_dirty_pages, resume_vm=resume_vm,
        )  # fmt: skip
        return self._invoke("snapshot.load", params, on_progress)

    def snapshot_describe(
        self, snapshot_path: str, *, mem_file_path: str | None = None, verify: Verify = "none"
    ) -> _R:
        """``snapshot.describe`` (a damaged file answers ``ok: false``, not an error)."""
        params = _drop_none(snapshot_path=snapshot_path, mem_file_path=mem_file_path,
                            verify=verify)  # fmt: skip
        return self._invoke("snapshot.describe", params)

    def snapshot_rebase(
        self,
        base_snapshot_path: str,
        output_snapshot_path: str,
        *,
        diff_snapshot_path: str | None = None,
        diff_snapshot_paths: list[str] | None = None,
        output_mem_file_path: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> _R:
        """``snapshot.rebase``: merge one Diff, or a chain, onto its Full base."""
        params = _drop_none(
            base_snapshot_path=base_snapshot_path, output_snapshot_path=output_snapshot_path,
            diff_snapshot_path=diff_snapshot_path, diff_snapshot_paths=diff_snapshot_paths,
            output_mem_file_path=output_mem_file_path,
        )  # fmt: skip
        return self._invoke("snapshot.rebase", params, on_progress)

    def snapshot_list(
        self, *, root: str | None = None, vm_id: str | None = None, label: str | None = None
    ) -> _R:
        """``snapshot.list``: pairs under the allowed roots (``label``: KEY or KEY=VALUE)."""
        return self._invoke("snapshot.list", _drop_none(root=root, vm_id=vm_id, label=label))

    def snapshot_delete(self, snapshot_path: str, *, force: bool = False) -> _R:
        """``snapshot.delete``: remove a pair crash-safely."""
        return self._invoke("snapshot.delete", {"snapshot_path": snapshot_path, "force": force})

    def store_push(
        self, snapshot_path: str, store: str, name: str, *,
        on_progress: ProgressCallback | None = None,
    ) -> _R:
        """``store.push``: upload a committed local pair to a store under ``name``."""
        return self._invoke(
            "store.push", {"snapshot_path": snapshot_path, "store": store, "name": name},
            on_progress,
        )

    def store_list(self, store: str, *, prefix: str = "") -> _R:
        """``store.list``: the complete snapshots in a store (names starting with ``prefix``)."""
        return self._invoke("store.list", {"store": store, "prefix": prefix})

    def store_pull(
        self, store: str, name: str, snapshot_path: str, mem_file_path: str, *,
        on_progress: ProgressCallback | None = None,
    ) -> _R:
        """``store.pull``: materialise a stored snapshot as a committed local pair."""
        return self._invoke("store.pull", {
            "store": store, "name": name, "snapshot_path": snapshot_path,
            "mem_file_path": mem_file_path,
        }, on_progress)  # fmt: skip

    def store_restore(
        self, vm_id: str, store: str, name: str, *, lazy: bool = True,
        resume_vm: bool = False, track_dirty_pages: bool = False,
        on_progress: ProgressCallback | None = None,
    ) -> _R:
        """``store.restore``: run a VM from a stored snapshot (lazily by default)."""
        return self._invoke("store.restore", {
            "vm_id": vm_id, "store": store, "name": name, "lazy": lazy,
            "resume_vm": resume_vm, "track_dirty_pages": track_dirty_pages,
        }, on_progress)  # fmt: skip

    def store_delete(self, store: str, name: str) -> _R:
        """``store.delete``: remove a snapshot from a store (its chunks go at the next gc)."""
        return self._invoke("store.delete", {"store": store, "name": name})

    def store_gc(self, store: str, *, grace_s: int = 3600) -> _R:
        """``store.gc``: delete unreferenced chunks older than ``grace_s`` seconds."""
        return self._invoke("store.gc", {"store": store, "grace_s": grace_s})

    def vm_read_memory(self, vm_id: str, guest_addr: int, length: int) -> _R:
        """``vm.read_memory`` (squibd --debug-api)."""
        return self._invoke(
            "vm.read_memory", {"vm_id": vm_id, "guest_addr": guest_addr, "length": length}
        )

    def vm_write_memory(self, vm_id: str, guest_addr: int, data_base64: str) -> _R:
        """``vm.write_memory`` (squibd --debug-api)."""
        return self._invoke(
            "vm.write_memory",
            {"vm_id": vm_id, "guest_addr": guest_addr, "data_base64": data_base64},
        )
