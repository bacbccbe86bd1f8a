"""The KVM backend: VMs, vCPUs and their threads, built-in guest programs.

Synchronous code; each vCPU runs ``KVM_RUN`` in its own OS thread
(:class:`VcpuRunner`). See ``docs/ARCHITECTURE.md`` ("The parts").
"""

from .dirty_ring import DirtyRingInUse
from .errors import (
    GuestProgramError,
    KvmError,
    KvmIoctlError,
    KvmUnavailable,
    KvmUnsupported,
    VcpuLimitExceeded,
)
from .guest import (
    HEARTBEAT_PORT,
    PROGRAMS,
    STALL_PORT,
    GuestImage,
    build_guest,
    control_addr,
    progress_addr,
)
from .runner import VcpuRunner, install_signal_handler
from .system import Kvm
from .vcpu import Vcpu
from .vm import DirtyLogNotEnabled, KvmVm, MemorySlot

__all__ = [
    "HEARTBEAT_PORT",
    "PROGRAMS",
    "STALL_PORT",
    "DirtyLogNotEnabled",
    "DirtyRingInUse",
    "GuestImage",
    "GuestProgramError",
    "Kvm",
    "KvmError",
    "KvmIoctlError",
    "KvmUnavailable",
    "KvmUnsupported",
    "KvmVm",
    "MemorySlot",
    "Vcpu",
    "VcpuLimitExceeded",
    "VcpuRunner",
    "build_guest",
    "control_addr",
    "install_signal_handler",
    "progress_addr",
]
