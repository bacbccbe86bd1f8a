# ruff: noqa: RUF009  (wire_field and its wrappers return attrs fields, not values)
"""Params and results of every JSON-RPC method: frozen attrs values.

Names follow Firecracker's API (SPEC section 9). Constraints are declared
with :func:`~squibd.api.wire.wire_field`, so they are both checked when
params are structured and published in ``protocol/openrpc.json``.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import attrs
import cattrs

from ..kvm.guest import PROGRAM_PARAMETERS
from ..snapshot.compat import MAX_VCPUS
from ..snapshot.models import PROGRAM_NAMES, ProgramName
from .wire import FieldValueError, WireTypeError, wire_field

__all__ = [
    "GUEST_PARAMETERS",
    "MAX_MEMORY_ACCESS",
    "MAX_VCPUS",
    "MAX_WRITE_MEMORY",
    "MAX_WRITE_MEMORY_BASE64",
    "VM_ID_PATTERN",
    "DestroyResult",
    "EmptyParams",
    "GuestParams",
    "MemBackendParams",
    "ReadMemoryParams",
    "ReadMemoryResult",
    "RebaseParams",
    "RebaseResult",
    "SnapshotCreateParams",
    "SnapshotCreateResult",
    "SnapshotDescribeParams",
    "SnapshotLoadParams",
    "SnapshotLoadResult",
    "StatusResult",
    "VmCreateParams",
    "VmIdParams",
    "VmInfo",
    "VmListResult",
    "WriteMemoryParams",
    "WriteMemoryResult",
    "register_model_hooks",
]

#: Issue 5: vm_id is 1-64 characters of [A-Za-z0-9_-].
VM_ID_PATTERN: Final = r"[A-Za-z0-9_-]{1,64}"
#: Issue 5: vm.read_memory reads at most 1 MiB.
MAX_MEMORY_ACCESS: Final = 1024 * 1024
#: Issue 10: vm.write_memory writes at most 764 KiB, so that the request (the data as
#: base64, 1,043,116 characters, plus up to 5 KiB of envelope) fits SPEC section 9's
#: 1 MiB line cap. 1 MiB of data would be 1.4 MB of base64: a line the daemon refuses.
MAX_WRITE_MEMORY: Final = 764 * 1024
#: The longest data_base64 of vm.write_memory: base64 of MAX_WRITE_MEMORY bytes.
MAX_WRITE_MEMORY_BASE64: Final = -(-MAX_WRITE_MEMORY // 3) * 4
#: The largest guest we accept, in MiB (the host has 24 GiB; 1 TiB is a sanity bound).
MAX_MEM_SIZE_MIB: Final = 1024 * 1024

ProgressToken = int | str

#: snapshot.create ``labels``: small (issue 13).
MAX_LABELS: Final = 32
LABEL_KEY_PATTERN: Final = r"[A-Za-z0-9_.\-/]{1,63}"
MAX_LABEL_VALUE: Final = 255


def check_labels(labels: dict[str, str]) -> None:
    """Refuse labels that are not small: at most 32, short keys, short values."""
    import re

    if len(labels) > MAX_LABELS:
        raise FieldValueError("labels", f"at most {MAX_LABELS} labels, got {len(labels)}")
    for key, value in labels.items():
        if re.fullmatch(LABEL_KEY_PATTERN, key) is None:
            raise FieldValueError("labels", f"key {key!r} must match {LABEL_KEY_PATTERN}")
        if len(value) > MAX_LABEL_VALUE:
            raise FieldValueError(
                "labels", f"value of {key!r} is longer than {MAX_LABEL_VALUE} characters"
            )


def _vm_id() -> Any:
    return wire_field(description="the VM's id", pattern=VM_ID_PATTERN)


def _progress_token() -> Any:
    return wire_field(
        default=None,
        description="when set, $/progress notifications with this token are sent",
    )


def _path(description: str, *, default: Any = attrs.NOTHING) -> Any:
    return wire_field(default=default, description=description)


@attrs.frozen
class EmptyParams:
    """No parameters."""


@attrs.frozen
class StatusResult:
    """``daemon.status``: who is answering and what it can do."""

    version: str
    pid: int
    uptime_s: float
    vm_count: int
    kvm_available: bool
    debug_api: bool


@attrs.frozen
class GuestParams:
    """The built-in guest program a VM runs, and its integer parameters.

    On the wire the parameters sit beside ``program`` in one flat object:
    ``{"program": "memwriter", "pages": 64}`` (see :func:`register_model_hooks`).
    """

    program: ProgramName = wire_field(
        description="the built-in guest program"
    )
    params: dict[str, int] = attrs.field(factory=dict)


#: The integer parameters of each built-in guest program (defined by the KVM backend).
GUEST_PARAMETERS: Final[dict[str, tuple[str, ...]]] = PROGRAM_PARAMETERS


def _structure_guest(value: Any, _type: Any) -> GuestParams:
    if not isinstance(value, dict):
        raise WireTypeError("expected an object")
    if "program" not in value:
        raise KeyError("program")
    program = value["program"]
    if not isinstance(program, str) or program not in PROGRAM_NAMES:
        names = ", ".join(repr(name) for name in PROGRAM_NAMES)
        raise FieldValueError("program", f"expected one of {names}, got {program!r}")
    params: dict[str, int] = {}
    allowed = GUEST_PARAMETERS[program]
    for key, item in value.items():
        if key == "program":
            continue
        if key not in allowed:
            takes = ", ".join(allowed) if allowed else "no parameters"
            raise FieldValueError(key, f"unknown field ({program} takes {takes})")
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise FieldValueError(key, f"expected a non-negative integer, got {item!r}")
        params[key] = item
    return GuestParams(PROGRAM_NAMES[PROGRAM_NAMES.index(program)], params)


def register_model_hooks(converter: cattrs.Converter) -> None:
    """Install the hooks of models whose wire shape is not their attrs shape."""
    converter.register_structure_hook(GuestParams, _structure_guest)


@attrs.frozen
class VmCreateParams:
    """``vm.create``."""

    vm_id: str = _vm_id()
    vcpu_count: int = wire_field(description="vCPUs", minimum=1, maximum=MAX_VCPUS)
    mem_size_mib: int = wire_field(
        description="guest RAM in MiB", minimum=1, maximum=MAX_MEM_SIZE_MIB
    )
    guest: GuestParams = wire_field(description="the guest program to run")
    track_dirty_pages: bool = wire_field(
        default=False, description="enable dirty page tracking (needed for Diff snapshots)"
    )
    api_socket: str | None = wire_field(
        default=None,
        description="also serve Firecracker's REST API for this VM on this Unix socket",
    )
    memory_layout: Literal["squibd", "firecracker"] = wire_field(
        default="squibd",
        description="guest RAM layout above 3 GiB: squibd's, or Firecracker v1.13+'s "
        "(32-bit gap at 0xC000_0000, 64-bit gap at 256 GiB)",
    )


@attrs.frozen
class VmIdParams:
    """Methods that name one VM."""

    vm_id: str = _vm_id()


@attrs.frozen
class VmInfo:
    """What ``vm.describe`` reports."""

    vm_id: str
    state: Literal["NotStarted", "Running", "Paused"]
    vcpu_count: int
    mem_size_mib: int
    track_dirty_pages: bool
    #: null when guest memory never answered in time (a lazy VM whose page server stalls).
    guest_progress: list[int] | None
    guest_program: str | None = None
    error: str | None = None
    #: true when guest_progress is the last known value, not read for this answer.
    guest_progress_stale: bool = False
    #: The state file the daemon restored this VM from at its start (on_shutdown = "save").
    restored_from: str | None = None
    #: pid of the process that runs the VM (its VM process; the daemon's own when in-process).
    process_id: int | None = None
    #: The guest-physical RAM layout its regions follow: "squibd" or "firecracker" (set by
    #: vm.create's memory_layout or the loaded state file; up to 3 GiB both are "squibd").
    memory_layout: str | None = None
    #: The path of the VM's Firecracker API socket (vm.create's api_socket), if it has one.
    api_socket: str | None = None


@attrs.frozen
class VmListResult:
    """``vm.list``: every VM, sorted by id."""

    vms: list[VmInfo]


@attrs.frozen
class DestroyResult:
    """``vm.destroy``."""

    vm_id: str
    destroyed: bool


@attrs.frozen
class SnapshotCreateParams:
    """``snapshot.create``."""

    vm_id: str = _vm_id()
    snapshot_path: str = _path("where the state file goes")
    mem_file_path: str = _path("where the memory file goes")
    snapshot_type: Literal["Full", "Diff"] = wire_field(
        default="Full", description="Full, or Diff (pages dirtied since the last checkpoint)"
    )
    labels: dict[str, str] = attrs.field(
        factory=dict,
        validator=lambda _i, _a, v: check_labels(v),
        metadata={"wire": {"description": "labels stored in the state file (string to string, "
                           f"at most {MAX_LABELS}; keys match {LABEL_KEY_PATTERN}, values at "
                           f"most {MAX_LABEL_VALUE} characters)"}},
    )  # fmt: skip
    live: bool = wire_field(
        default=False, description="pre-copy memory while the guest runs (short pause)"
    )
    progress_token: ProgressToken | None = _progress_token()


@attrs.frozen
class SnapshotCreateResult:
    """``snapshot.create``: what was written and how long the guest was paused."""

    snapshot_type: str
    snapshot_path: str
    mem_file_path: str
    pair_id: str
    bytes_written: int
    pages_written: int
    passes: int
    pause_ms: float
    duration_ms: float


@attrs.frozen
class MemBackendParams:
    """Where a loaded VM's memory comes from (SPEC section 8)."""

    backend_type: Literal["File", "Uffd"] = wire_field(
        description="File: map the memory file; Uffd: fetch pages from a page server"
    )
    backend_path: str = _path("the memory file (File) or the page server's socket (Uffd)")


@attrs.frozen
class SnapshotLoadParams:
    """``snapshot.load``: exactly one of ``mem_backend`` and ``mem_file_path``."""

    vm_id: str = _vm_id()
    snapshot_path: str = _path("the state file")
    mem_backend: MemBackendParams | None = wire_field(
        default=None, description="the memory backend"
    )
    mem_file_path: str | None = _path(
        "the memory file (older form of mem_backend File)", default=None
    )
    track_dirty_pages: bool = wire_field(default=False, description="track dirty pages")
    resume_vm: bool = wire_field(default=False, description="run the VM after loading")
    progress_token: ProgressToken | None = _progress_token()


@attrs.frozen
class SnapshotLoadResult:
    """``snapshot.load``: the loaded VM and how long the load took."""

    vm: VmInfo
    duration_ms: float
    #: Guest memory the VM was restored with, in bytes (mapped or served by the page server).
    bytes_restored: int = 0


@attrs.frozen
class SnapshotDescribeParams:
    """``snapshot.describe``."""

    snapshot_path: str = _path("the state file")
    mem_file_path: str | None = _path("the memory file to check", default=None)
    verify: Literal["none", "size", "full"] = wire_field(
        default="none", description="how much of the memory file to check"
    )


@attrs.frozen
class RebaseParams:
    """``snapshot.rebase``: merge a Diff onto its Full base into a new Full pair."""

    base_snapshot_path: str = _path("the Full snapshot's state file")
    output_snapshot_path: str = _path("the merged state file")
    output_mem_file_path: str | None = _path(
        "the merged memory file (default: beside the output state file)", default=None
    )
    diff_snapshot_path: str | None = _path(
        "the Diff snapshot's state file (or give diff_snapshot_paths)", default=None
    )
    diff_snapshot_paths: list[str] | None = _path(
        "a chain of Diff state files, oldest first, applied in order", default=None
    )
    progress_token: ProgressToken | None = _progress_token()


@attrs.frozen
class RebaseResult:
    """``snapshot.rebase``."""

    output_snapshot_path: str
    output_mem_file_path: str
    duration_ms: float
    #: Data bytes of the merged output memory file (its manifest's extents).
    bytes_written: int = 0


@attrs.frozen
class ReadMemoryParams:
    """``vm.read_memory`` (debug API only)."""

    vm_id: str = _vm_id()
    guest_addr: int = wire_field(description="guest-physical address", minimum=0)
    length: int = wire_field(
        description="bytes to read", minimum=0, maximum=MAX_MEMORY_ACCESS
    )


@attrs.frozen
class ReadMemoryResult:
    """``vm.read_memory``."""

    data_base64: str


@attrs.frozen
class WriteMemoryParams:
    """``vm.write_memory`` (debug API only); the pages are marked dirty."""

    vm_id: str = _vm_id()
    guest_addr: int = wire_field(description="guest-physical address", minimum=0)
    data_base64: str = wire_field(
        description=(
            f"the bytes to write, base64: at most {MAX_WRITE_MEMORY} bytes "
            f"({MAX_WRITE_MEMORY // 1024} KiB), so the request fits the 1 MiB line"
        ),
        max_length=MAX_WRITE_MEMORY_BASE64,
    )


@attrs.frozen
class WriteMemoryResult:
    """``vm.write_memory``."""

    bytes_written: int
