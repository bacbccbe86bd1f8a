"""Firecracker's REST API for one VM, mapped onto squibd's method table (issue 14).

Theory of operation
-------------------
A :class:`FirecrackerApp` serves one VM slot, named by ``vm_id``. The HTTP
side (``squibd.server._firecracker``) hands it ``(method, path, body)`` and
writes back the :class:`~squibd.server.HttpResponse` it returns. Requests
are handled one at a time (a lock), as Firecracker's API thread does.

The slot is either *empty* (``squibd --firecracker-api-socket``: no VM until
``InstanceStart`` or ``PUT /snapshot/load``) or holds a VM created by
``vm.create`` with ``api_socket``. Before the VM exists, ``PUT
/machine-config`` and ``PUT /boot-source`` are remembered; once it exists
and has not started, they rebuild it (it has no state yet to lose).

Every route that acts on the VM goes through :func:`~squibd.api.dispatch`
with the JSON-RPC method it corresponds to (``vm.create``, ``vm.start``,
``vm.pause``, ``vm.resume``, ``snapshot.create``, ``snapshot.load``), so
validation, paths and errors are the JSON-RPC API's. Status codes and
bodies are Firecracker's: ``204`` with no body for a PUT/PATCH that worked,
``200`` with JSON for a GET, ``400 {"fault_message"}`` for every refusal
(unknown routes too), ``503`` for ``QuiesceTimeout``, ``500`` for a bug.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol, TypeVar

import attrs
import trio

import squibd
from squibd.rpc import RpcError

from .context import ApiContext, CallInfo
from .errors import internal_error, map_exception
from .firecracker_models import (
    BUILTIN_IMAGES,
    BUILTIN_PREFIX,
    DEFAULT_MEM_SIZE_MIB,
    DEFAULT_VCPU_COUNT,
    FcBootSource,
    FcInstanceAction,
    FcMachineConfig,
    FcSnapshotCreate,
    FcSnapshotLoad,
    FcVmState,
)
from .methods import UnexpectedHandlerError, dispatch
from .models import GUEST_PARAMETERS
from .wire import structure_params

__all__ = [
    "APP_NAME",
    "DEFAULT_SLOT_ID",
    "FIRECRACKER_API_VERSION",
    "ApiSocketHost",
    "FirecrackerApp",
    "HttpResponse",
]

#: The Firecracker API level squibd speaks (``GET /version``): the routes and
#: bodies below follow firecracker.yaml of v1.13.
FIRECRACKER_API_VERSION: Final = "1.13.0"
#: ``GET /``'s ``app_name``: who answers (Firecracker answers "Firecracker").
APP_NAME: Final = "squibd"
#: Firecracker's instance id when none is given (``--id``).
DEFAULT_SLOT_ID: Final = "anonymous-instance"

HTTP_OK: Final = 200
HTTP_NO_CONTENT: Final = 204
HTTP_BAD_REQUEST: Final = 400
HTTP_INTERNAL_ERROR: Final = 500
HTTP_SERVICE_UNAVAILABLE: Final = 503
#: SPEC section 2: the snapshot error kind answered 503 (Firecracker's mapping).
_QUIESCE_TIMEOUT_KIND: Final = "QuiesceTimeout"

#: squibd VM states -> Firecracker's InstanceInfo.state.
_FC_STATE: Final = {"NotStarted": "Not started", "Running": "Running", "Paused": "Paused"}

#: Firecracker routes for devices and services squibd VMs do not have.
_UNSUPPORTED_PREFIXES: Final = (
    "/balloon", "/cpu-config", "/drives", "/entropy", "/hotplug", "/logger", "/metrics",
    "/mmds", "/network-interfaces", "/pmem", "/serial", "/vsock",
)  # fmt: skip

_T = TypeVar("_T")

log = logging.getLogger("squibd.firecracker")


@attrs.frozen
class HttpResponse:
    """An answer: a status and a JSON body (``None`` for no body, as ``204``)."""

    status: int
    body: Any = None


class ApiSocketHost(Protocol):
    """What ``vm.create``'s ``api_socket`` needs from the server (sockets are its business)."""

    async def open_api_socket(self, vm_id: str, path: str) -> None:
        """Serve ``vm_id``'s Firecracker API on a new socket at ``path``."""
        ...

    async def close_api_socket(self, vm_id: str) -> None:
        """Stop serving ``vm_id``'s socket and remove it (no-op when it has none)."""
        ...

    def path_of(self, vm_id: str) -> str | None:
        """The API socket path of ``vm_id``, if it has one."""
        ...


class _Fault(Exception):
    """A refusal of this API (answered with its status and fault_message)."""

    def __init__(self, message: str, status: int = HTTP_BAD_REQUEST) -> None:
        super().__init__(message)
        self.response = HttpResponse(status, {"fault_message": message})


def _parse(body: bytes, cls: type[_T], api: ApiContext) -> _T:
    """Structure a JSON body strictly (unknown fields refused, as Firecracker does)."""
    prefix = "An error occurred when deserializing the json body of a request"
    if not body.strip():
        raise _Fault(f"{prefix}: the body is empty; this route needs a JSON object")
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _Fault(f"{prefix}: {exc}") from exc
    if not isinstance(value, dict):
        raise _Fault(f"{prefix}: expected a JSON object")
    try:
        return structure_params(api.converter, value, cls)
    except RpcError as exc:
        detail = str(exc).removeprefix("Invalid params: ").replace("params.", "")
        raise _Fault(f"{prefix}: {detail}") from exc


def _guest_from_boot(boot: FcBootSource) -> dict[str, Any]:
    """``vm.create``'s ``guest`` for a boot source (``builtin:PROGRAM`` + NAME=INT args)."""
    path = boot.kernel_image_path
    program = path.removeprefix(BUILTIN_PREFIX)
    if not path.startswith(BUILTIN_PREFIX) or program not in GUEST_PARAMETERS:
        known = ", ".join(BUILTIN_PREFIX + name for name in GUEST_PARAMETERS)
        raise _Fault(
            f"kernel_image_path {path!r}: squibd runs built-in guest programs only, not "
            f"kernel images; use one of {known}"
        )
    if boot.initrd_path is not None:
        raise _Fault("initrd_path: squibd's built-in guest programs take no initrd")
    guest: dict[str, Any] = {"program": program}
    for word in (boot.boot_args or "").split():
        name, sep, value = word.partition("=")
        if not sep or not value.isdigit():
            raise _Fault(f"boot_args: {word!r} is not NAME=INTEGER (a guest parameter)")
        guest[name] = int(value)
    return guest


def _boot_of(guest: dict[str, Any]) -> dict[str, Any]:
    """firecracker.yaml ``BootSource`` for a ``vm.create`` guest."""
    out: dict[str, Any] = {"kernel_image_path": BUILTIN_PREFIX + str(guest["program"])}
    args = " ".join(f"{k}={v}" for k, v in guest.items() if k != "program")
    if args:
        out["boot_args"] = args
    return out


@attrs.define(eq=False)
class FirecrackerApp:
    """One VM slot's Firecracker REST API (see the module doc).

    Args:
        api: the daemon's API context.
        vm_id: the VM this slot holds (or will hold).
        memory_layout: the layout a VM built by ``InstanceStart`` gets.
    """

    api: ApiContext
    vm_id: str
    memory_layout: str = "squibd"
    _machine: FcMachineConfig = attrs.field(
        factory=lambda: FcMachineConfig(DEFAULT_VCPU_COUNT, DEFAULT_MEM_SIZE_MIB)
    )
    _guest: dict[str, Any] | None = None
    _lock: trio.Lock = attrs.field(factory=trio.Lock)

    @classmethod
    def for_vm(cls, api: ApiContext, vm_id: str) -> FirecrackerApp:
        """The app of a VM that exists (created by ``vm.create`` with ``api_socket``)."""
        vm = api.runtime.get(vm_id)
        app = cls(api, vm_id, memory_layout=vm.memory_layout)
        app._machine = FcMachineConfig(vm.vcpu_count, vm.mem_size_mib,
                                       track_dirty_pages=vm.track_dirty_pages)  # fmt: skip
        if vm.guest is not None:
            app._guest = {"program": vm.guest.program, **vm.guest.params}
        return app

    # --- entry point -----------------------------------------------------

    async def handle(self, method: str, path: str, body: bytes) -> HttpResponse:
        """Answer one request (never raises)."""
        route = _ROUTES.get((method, path.rstrip("/") or "/"))
        if route is None:
            return self._no_route(method, path)
        try:
            async with self._lock:
                return await route(self, body)
        except _Fault as fault:
            return fault.response
        except UnexpectedHandlerError as exc:
            log.error("%s %s failed", method, path, exc_info=exc.__cause__ or exc)
            return _Fault(exc.rpc_error.error.message, HTTP_INTERNAL_ERROR).response
        except Exception as exc:  # runtime errors of the direct calls (_rebuild)
            mapped = map_exception(exc)
            if mapped is None:
                log.exception("%s %s failed", method, path)
                return _Fault(internal_error(exc).error.message, HTTP_INTERNAL_ERROR).response
            return _from_rpc(mapped)

    @staticmethod
    def _no_route(method: str, path: str) -> HttpResponse:
        if path.startswith(_UNSUPPORTED_PREFIXES) or path == "/machine-config":
            message = (
                f"squibd does not serve {method} {path}: its VMs run built-in guest programs "
                "and have no devices, logger, metrics or MMDS"
            )
        else:
            message = f"Invalid request method and/or path: {method} {path}."
        return HttpResponse(HTTP_BAD_REQUEST, {"fault_message": message})

    # --- helpers ---------------------------------------------------------

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        return await dispatch(self.api, CallInfo(None), method, {"vm_id": self.vm_id, **params})

    def _state(self) -> str | None:
        """The VM's squibd state, or None while the slot is empty."""
        if self.vm_id not in self.api.runtime.list():
            return None
        return self.api.runtime.describe(self.vm_id).state

    def _require_state(self, wanted: tuple[str, ...], doing: str) -> str:
        state = self._state()
        if state is None:
            raise _Fault(f"cannot {doing}: the microVM is not started (the slot is empty)")
        if state not in wanted:
            raise _Fault(f"cannot {doing}: the microVM is {_FC_STATE.get(state, state)}")
        return state

    def _machine_json(self) -> dict[str, Any]:
        machine = self._machine
        if self._state() is not None:
            d = self.api.runtime.describe(self.vm_id)
            machine = FcMachineConfig(d.vcpu_count, d.mem_size_mib,
                                      track_dirty_pages=d.track_dirty_pages)  # fmt: skip
        return {
            "vcpu_count": machine.vcpu_count,
            "mem_size_mib": machine.mem_size_mib,
            "smt": False,
            "track_dirty_pages": machine.track_dirty_pages,
            "huge_pages": "None",
        }

    async def _create(self, machine: FcMachineConfig, guest: dict[str, Any]) -> None:
        await self._call(
            "vm.create",
            {
                "vcpu_count": machine.vcpu_count,
                "mem_size_mib": machine.mem_size_mib,
                "track_dirty_pages": machine.track_dirty_pages,
                "guest": guest,
                "memory_layout": self.memory_layout,
            },
        )

    async def _rebuild(self, machine: FcMachineConfig, guest: dict[str, Any] | None) -> None:
        """Replace the NotStarted VM by one with the new config (it has no state to lose).

        The new config is validated by building the new VM; when that fails the
        old one is built again, so the slot keeps working with its old config.
        """
        if self._state() is None:
            return
        if guest is None:
            raise _Fault("no boot source: PUT /boot-source first")
        await self.api.runtime.destroy(self.vm_id)
        try:
            await self._create(machine, guest)
        except BaseException:
            if self._guest is not None:
                with trio.CancelScope(shield=True):
                    await self._create(self._machine, self._guest)
            raise

    # --- routes ----------------------------------------------------------

    async def _get_root(self, body: bytes) -> HttpResponse:
        state = self._state() or "NotStarted"
        return HttpResponse(HTTP_OK, {
            "id": self.vm_id,
            "state": _FC_STATE.get(state, state),
            "vmm_version": squibd.__version__,
            "app_name": APP_NAME,
        })  # fmt: skip

    async def _get_version(self, body: bytes) -> HttpResponse:
        return HttpResponse(HTTP_OK, {"firecracker_version": FIRECRACKER_API_VERSION})

    async def _get_machine_config(self, body: bytes) -> HttpResponse:
        return HttpResponse(HTTP_OK, self._machine_json())

    async def _put_machine_config(self, body: bytes) -> HttpResponse:
        machine = _parse(body, FcMachineConfig, self.api)
        if machine.smt:
            raise _Fault("smt: squibd VMs do not support simultaneous multithreading")
        if machine.cpu_template not in (None, "None"):
            raise _Fault(
                f"cpu_template: squibd applies no CPU templates ({machine.cpu_template!r})"
            )
        if machine.huge_pages not in (None, "None"):
            raise _Fault(f"huge_pages: squibd backs guest RAM with 4 KiB pages only "
                         f"({machine.huge_pages!r})")  # fmt: skip
        if self._state() not in (None, "NotStarted"):
            raise _Fault("The update operation is not allowed after the microVM started.")
        await self._rebuild(machine, self._guest)
        self._machine = machine
        return HttpResponse(HTTP_NO_CONTENT)

    async def _put_boot_source(self, body: bytes) -> HttpResponse:
        guest = _guest_from_boot(_parse(body, FcBootSource, self.api))
        if self._state() not in (None, "NotStarted"):
            raise _Fault("The update operation is not allowed after the microVM started.")
        await self._rebuild(self._machine, guest)
        self._guest = guest
        return HttpResponse(HTTP_NO_CONTENT)

    async def _put_actions(self, body: bytes) -> HttpResponse:
        action = _parse(body, FcInstanceAction, self.api).action_type
        if action != "InstanceStart":
            raise _Fault(f"{action}: squibd VMs have no Firecracker metrics or keyboard device")
        state = self._state()
        if state is None:
            if self._guest is None:
                raise _Fault(
                    "Cannot start the microVM without a boot source: PUT /boot-source with "
                    f"kernel_image_path {BUILTIN_IMAGES} first"
                )
            await self._create(self._machine, self._guest)
            try:
                await self._call("vm.start", {})
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.api.runtime.destroy(self.vm_id)
                raise
            return HttpResponse(HTTP_NO_CONTENT)
        self._require_state(("NotStarted",), "start the microVM")
        await self._call("vm.start", {})
        return HttpResponse(HTTP_NO_CONTENT)

    async def _patch_vm(self, body: bytes) -> HttpResponse:
        wanted = _parse(body, FcVmState, self.api).state
        state = self._require_state(("Running", "Paused"), f"set the microVM {wanted}")
        if wanted == "Paused" and state == "Running":
            await self._call("vm.pause", {})
        elif wanted == "Resumed" and state == "Paused":
            await self._call("vm.resume", {})
        return HttpResponse(HTTP_NO_CONTENT)

    async def _get_vm_config(self, body: bytes) -> HttpResponse:
        config: dict[str, Any] = {
            "machine-config": self._machine_json(),
            "drives": [],
            "network-interfaces": [],
        }
        if self._state() is not None:
            vm = self.api.runtime.get(self.vm_id)
            if vm.guest is not None:
                config["boot-source"] = _boot_of({"program": vm.guest.program, **vm.guest.params})
        elif self._guest is not None:
            config["boot-source"] = _boot_of(self._guest)
        return HttpResponse(HTTP_OK, config)

    async def _put_snapshot_create(self, body: bytes) -> HttpResponse:
        request = _parse(body, FcSnapshotCreate, self.api)
        self._require_state(("Paused",), "create a snapshot (Firecracker requires a Paused "
                                         "microVM: PATCH /vm {\"state\": \"Paused\"} first)")
        await self._call("snapshot.create", {
            "snapshot_path": request.snapshot_path,
            "mem_file_path": request.mem_file_path,
            "snapshot_type": request.snapshot_type,
        })  # fmt: skip
        return HttpResponse(HTTP_NO_CONTENT)

    async def _put_snapshot_load(self, body: bytes) -> HttpResponse:
        request = _parse(body, FcSnapshotLoad, self.api)
        if request.clock_realtime:
            raise _Fault(
                "clock_realtime: squibd restores kvmclock at its saved value; advancing it by "
                "the wall-clock time since the save is not supported"
            )
        if request.network_overrides:
            raise _Fault("network_overrides: squibd VMs have no network interfaces to override")
        if request.vsock_override is not None:
            raise _Fault("vsock_override: squibd VMs have no vsock device to override")
        if (request.mem_backend is None) == (request.mem_file_path is None):
            raise _Fault("exactly one of mem_backend and mem_file_path must be given")
        if self._state() not in (None, "NotStarted"):
            raise _Fault(
                "Loading a snapshot is only allowed into a microVM that has not started "
                "(a fresh slot)"
            )
        params: dict[str, Any] = {
            "snapshot_path": request.snapshot_path,
            "track_dirty_pages": request.track_dirty_pages or request.enable_diff_snapshots,
            "resume_vm": request.resume_vm,
        }
        if request.mem_backend is not None:
            params["mem_backend"] = {
                "backend_type": request.mem_backend.backend_type,
                "backend_path": request.mem_backend.backend_path,
            }
        else:
            params["mem_file_path"] = request.mem_file_path
        await self._call("snapshot.load", params)
        return HttpResponse(HTTP_NO_CONTENT)


def _from_rpc(exc: RpcError) -> HttpResponse:
    data = exc.error.data
    kind = data.get("kind") if isinstance(data, dict) else None
    message = data.get("fault_message") if isinstance(data, dict) else None
    status = HTTP_SERVICE_UNAVAILABLE if kind == _QUIESCE_TIMEOUT_KIND else HTTP_BAD_REQUEST
    return HttpResponse(status, {"fault_message": message or exc.error.message})


_Route = Callable[[FirecrackerApp, bytes], Awaitable[HttpResponse]]

#: (method, path) -> handler.
_ROUTES: Final[dict[tuple[str, str], _Route]] = {
    ("GET", "/"): FirecrackerApp._get_root,
    ("GET", "/version"): FirecrackerApp._get_version,
    ("GET", "/machine-config"): FirecrackerApp._get_machine_config,
    ("PUT", "/machine-config"): FirecrackerApp._put_machine_config,
    ("PUT", "/boot-source"): FirecrackerApp._put_boot_source,
    ("PUT", "/actions"): FirecrackerApp._put_actions,
    ("PATCH", "/vm"): FirecrackerApp._patch_vm,
    ("GET", "/vm/config"): FirecrackerApp._get_vm_config,
    ("PUT", "/snapshot/create"): FirecrackerApp._put_snapshot_create,
    ("PUT", "/snapshot/load"): FirecrackerApp._put_snapshot_load,
}
