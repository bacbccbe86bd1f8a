"""Values of the VM runtime API: guest specs, lifecycle states, results.

Everything here is a frozen attrs value; the runtime objects (``Vm``,
``Runtime``) live in ``machine.py`` and ``runtime.py``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, Protocol

import attrs

from ..snapshot.models import DEFAULT_PROGRAM

if TYPE_CHECKING:
    from ..snapshot.models import VmInfo

__all__ = [
    "BACKEND_FILE",
    "BACKEND_UFFD",
    "DEFAULT_MAX_PASSES",
    "DEFAULT_PAUSE_BUDGET_MS",
    "DEFAULT_QUIESCE_TIMEOUT_S",
    "DEFAULT_VM_ISOLATION",
    "SNAPSHOT_TYPES",
    "VM_ISOLATION_MODES",
    "GuestSpec",
    "MemBackend",
    "Progress",
    "SaveResult",
    "VmDescription",
    "VmFacts",
    "VmState",
    "describe_vm",
    "vm_info_of",
]

#: SPEC section 6: the quiesce cancel scope lasts 1 s by default.
DEFAULT_QUIESCE_TIMEOUT_S: Final = 1.0
#: Issue 6: a live save makes at most 8 passes by default.
DEFAULT_MAX_PASSES: Final = 8
#: Issue 6: the final (paused) pass of a live save targets 10 ms by default.
DEFAULT_PAUSE_BUDGET_MS: Final = 10.0
#: SPEC section 9: snapshot_type values.
SNAPSHOT_TYPES: Final = ("Full", "Diff")
#: ``[server] vm_isolation``: each VM in its own VM process (issue 11), or inside the daemon.
VM_ISOLATION_MODES: Final = ("process", "inprocess")
DEFAULT_VM_ISOLATION: Final = "process"
#: SPEC section 8: memory backends of snapshot.load.
BACKEND_FILE: Final = "File"
BACKEND_UFFD: Final = "Uffd"

#: progress(phase, done, total): phase names the step ("memory", "pass-2", ...).
Progress = Callable[[str, int, int], None]


class VmState(enum.Enum):
    """The lifecycle state of a VM (SPEC section 1)."""

    NOT_STARTED = "NotStarted"
    RUNNING = "Running"
    PAUSED = "Paused"

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class GuestSpec:
    """What the VM runs: a built-in guest program and its parameters."""

    program: str = DEFAULT_PROGRAM
    params: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen
class MemBackend:
    """Where a loaded VM's memory comes from (SPEC section 8)."""

    backend_type: str = attrs.field(
        validator=attrs.validators.in_((BACKEND_FILE, BACKEND_UFFD))
    )
    #: File: the memory file; Uffd: the page server's Unix socket.
    backend_path: str


@attrs.frozen
class VmDescription:
    """What ``vm.describe`` reports about one VM."""

    vm_id: str
    state: str
    vcpu_count: int
    mem_size_mib: int
    track_dirty_pages: bool
    guest_program: str | None
    #: One progress counter per vCPU (built-in guest programs only); None
    #: when no read of guest memory ever completed (a stalled page server).
    guest_progress: list[int] | None
    #: Non-None when the VM entered the error state (names what happened).
    error: str | None
    #: pair_id of the last checkpoint (the parent of the next Diff), if any.
    last_pair_id: str | None = None
    #: True when ``guest_progress`` is the last known value, not a read made
    #: for this answer (the read did not complete in time, or was not tried).
    guest_progress_stale: bool = False
    #: pid of the process running the VM (issue 11; the daemon's own for an in-process VM).
    process_id: int | None = None
    #: The guest-physical RAM layout its regions follow ("squibd" or "firecracker").
    memory_layout: str | None = None


@attrs.frozen
class SaveResult:
    """The outcome of a committed snapshot."""

    vm_id: str
    snapshot_type: str
    snapshot_path: str
    mem_file_path: str
    pair_id: str
    parent_pair_id: str | None
    bytes_written: int
    pages_written: int
    live: bool = False
    #: Number of memory passes (1 for a stop-and-copy save).
    passes: int = 1
    #: Bytes streamed by each pass, in order.
    bytes_per_pass: tuple[int, ...] = ()
    #: VM pause from quiesce start to resume (0 when the VM was already paused).
    pause_ms: float = 0.0
    #: True when a live save reached max_passes before its remainder fit the budget.
    pass_limit_reached: bool = False
    #: Wall time of the whole save, request to commit.
    duration_ms: float = 0.0


class VmFacts(Protocol):
    """What both VM handles (in-process ``Vm``, VM-process ``RemoteVm``) know of themselves."""

    @property
    def vm_id(self) -> str: ...
    @property
    def vcpu_count(self) -> int: ...
    @property
    def mem_size_mib(self) -> int: ...
    @property
    def track_dirty_pages(self) -> bool: ...
    @property
    def guest(self) -> GuestSpec | None: ...
    @property
    def error(self) -> str | None: ...
    @property
    def last_pair_id(self) -> str | None: ...
    @property
    def memory_layout(self) -> str: ...


def vm_info_of(vm: VmFacts) -> VmInfo:
    """How ``vm`` was created, for its state file."""
    from ..snapshot.models import VmInfo

    return VmInfo(
        mem_size_mib=vm.mem_size_mib,
        vcpu_count=vm.vcpu_count,
        track_dirty_pages=vm.track_dirty_pages,
        guest_program=vm.guest.program if vm.guest else None,
        guest_params=dict(vm.guest.params) if vm.guest else {},
        memory_layout=vm.memory_layout,
    )


def describe_vm(
    vm: VmFacts,
    state: str,
    progress: Sequence[int] | None,
    stale: bool,
    process_id: int | None,
) -> VmDescription:
    """``vm.describe``'s view of ``vm`` (``progress``: last read or known counters)."""
    return VmDescription(
        vm_id=vm.vm_id,
        state=state,
        vcpu_count=vm.vcpu_count,
        mem_size_mib=vm.mem_size_mib,
        track_dirty_pages=vm.track_dirty_pages,
        guest_program=vm.guest.program if vm.guest else None,
        guest_progress=None if progress is None else list(progress),
        guest_progress_stale=stale,
        error=vm.error,
        last_pair_id=vm.last_pair_id,
        process_id=process_id,
        memory_layout=vm.memory_layout,
    )
