# ruff: noqa: RUF009  (wire_field returns attrs fields, not values)
"""Request bodies of the Firecracker REST routes squibd serves (issue 14).

Field names, types and defaults follow Firecracker's published API
description (``src/firecracker/swagger/firecracker.yaml``, v1.13 to v1.16).
Bodies are structured with the same strict wire converter as JSON-RPC
params: unknown fields are refused, as Firecracker's serde models do.
Fields squibd cannot honour are accepted only with the value that asks for
nothing (``smt: false``, ``huge_pages: "None"``, ``clock_realtime: false``,
empty ``network_overrides``); :mod:`squibd.api.firecracker` refuses the rest
with a ``fault_message`` that says why.
"""

from __future__ import annotations

from typing import Final, Literal

import attrs

from ..snapshot.compat import MAX_VCPUS
from ..snapshot.models import PROGRAM_NAMES
from .wire import wire_field

__all__ = [
    "BUILTIN_IMAGES",
    "BUILTIN_PREFIX",
    "DEFAULT_MEM_SIZE_MIB",
    "DEFAULT_VCPU_COUNT",
    "FC_MAX_VCPUS",
    "FcBootSource",
    "FcInstanceAction",
    "FcMachineConfig",
    "FcMemoryBackend",
    "FcNetworkOverride",
    "FcSnapshotCreate",
    "FcSnapshotLoad",
    "FcVmState",
    "FcVsockOverride",
]

#: Firecracker's machine configuration before any PUT: 1 vCPU, 128 MiB.
DEFAULT_VCPU_COUNT: Final = 1
DEFAULT_MEM_SIZE_MIB: Final = 128
#: firecracker.yaml, MachineConfiguration.vcpu_count: 1 to 32, the same as squibd's own
#: limit (``snapshot.compat.MAX_VCPUS``), which is the one in force.
FC_MAX_VCPUS: Final = MAX_VCPUS
#: ``kernel_image_path`` of a built-in guest program: ``builtin:counter``.
BUILTIN_PREFIX: Final = "builtin:"
#: The accepted ``kernel_image_path`` values, for messages.
BUILTIN_IMAGES: Final = " or ".join(BUILTIN_PREFIX + name for name in PROGRAM_NAMES)
#: The largest guest accepted here, in MiB (as vm.create: 1 TiB).
_MAX_MEM_SIZE_MIB: Final = 1024 * 1024


@attrs.frozen
class FcMachineConfig:
    """``PUT /machine-config`` (firecracker.yaml ``MachineConfiguration``)."""

    vcpu_count: int = wire_field(description="vCPUs", minimum=1, maximum=FC_MAX_VCPUS)
    mem_size_mib: int = wire_field(
        description="guest RAM in MiB", minimum=1, maximum=_MAX_MEM_SIZE_MIB
    )
    smt: bool = wire_field(default=False, description="simultaneous multithreading")
    cpu_template: str | None = wire_field(default=None, description="CPU template")
    track_dirty_pages: bool = wire_field(default=False, description="dirty page tracking")
    huge_pages: Literal["None", "Transparent", "2M"] | None = wire_field(
        default=None, description="huge pages backing guest RAM"
    )


@attrs.frozen
class FcBootSource:
    """``PUT /boot-source`` (firecracker.yaml ``BootSource``)."""

    kernel_image_path: str = wire_field(description=BUILTIN_IMAGES)
    boot_args: str | None = wire_field(default=None, description="NAME=INT guest parameters")
    initrd_path: str | None = wire_field(default=None, description="an initrd (refused)")


@attrs.frozen
class FcInstanceAction:
    """``PUT /actions`` (firecracker.yaml ``InstanceActionInfo``)."""

    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"] = wire_field(
        description="the action"
    )


@attrs.frozen
class FcVmState:
    """``PATCH /vm`` (firecracker.yaml ``Vm``)."""

    state: Literal["Paused", "Resumed"] = wire_field(description="the wanted state")


@attrs.frozen
class FcSnapshotCreate:
    """``PUT /snapshot/create`` (firecracker.yaml ``SnapshotCreateParams``)."""

    snapshot_path: str = wire_field(description="the state file")
    mem_file_path: str = wire_field(description="the memory file")
    snapshot_type: Literal["Full", "Diff"] = wire_field(
        default="Full", description="Full or Diff"
    )


@attrs.frozen
class FcMemoryBackend:
    """firecracker.yaml ``MemoryBackend``."""

    backend_type: Literal["File", "Uffd"] = wire_field(description="File or Uffd")
    backend_path: str = wire_field(description="the memory file or the page server's socket")


@attrs.frozen
class FcNetworkOverride:
    """firecracker.yaml ``NetworkOverride``."""

    iface_id: str = wire_field(description="the interface")
    host_dev_name: str = wire_field(description="its new TAP device")


@attrs.frozen
class FcVsockOverride:
    """firecracker.yaml ``VsockOverride``."""

    uds_path: str = wire_field(description="the vsock's new socket")


@attrs.frozen
class FcSnapshotLoad:
    """``PUT /snapshot/load`` (firecracker.yaml ``SnapshotLoadParams``)."""

    snapshot_path: str = wire_field(description="the state file")
    mem_backend: FcMemoryBackend | None = wire_field(default=None, description="memory backend")
    mem_file_path: str | None = wire_field(default=None, description="memory file (deprecated)")
    track_dirty_pages: bool = wire_field(default=False, description="dirty page tracking")
    enable_diff_snapshots: bool = wire_field(
        default=False, description="deprecated alias of track_dirty_pages"
    )
    resume_vm: bool = wire_field(default=False, description="resume after loading")
    clock_realtime: bool = wire_field(default=False, description="advance kvmclock (refused)")
    network_overrides: list[FcNetworkOverride] | None = wire_field(
        default=None, description="TAP overrides (squibd VMs have no network devices)"
    )
    vsock_override: FcVsockOverride | None = wire_field(
        default=None, description="vsock override (squibd VMs have no vsock device)"
    )
