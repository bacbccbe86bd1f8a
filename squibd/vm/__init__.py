"""The VM runtime (trio): registry and lifecycle, quiesce, save/load orchestration.

Public names are re-exported lazily (on first attribute access), so that
importing ``squibd.vm.memory`` alone, as the page server and the KVM
backend's tests do, does not pull in KVM, trio orchestration and userfaultfd.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._threads import run_cancellable
    from .errors import (
        Busy,
        DiffNotAllowed,
        DuplicateVm,
        GuestMemoryUnavailable,
        InvalidVmConfig,
        LimitReached,
        NoParentCheckpoint,
        PairMismatch,
        ResourceExhausted,
        UnknownVm,
        VmError,
        VmFailed,
        WrongVmState,
    )
    from .machine import Vm
    from .models import GuestSpec, MemBackend, SaveResult, VmDescription, VmState
    from .runtime import Runtime

__all__ = [
    "Busy",
    "DiffNotAllowed",
    "DuplicateVm",
    "GuestMemoryUnavailable",
    "GuestSpec",
    "InvalidVmConfig",
    "LimitReached",
    "MemBackend",
    "NoParentCheckpoint",
    "PairMismatch",
    "ResourceExhausted",
    "Runtime",
    "SaveResult",
    "UnknownVm",
    "Vm",
    "VmDescription",
    "VmError",
    "VmFailed",
    "VmState",
    "WrongVmState",
    "run_cancellable",
]

_HOMES = {
    "Runtime": ".runtime",
    "Vm": ".machine",
    "GuestSpec": ".models",
    "MemBackend": ".models",
    "SaveResult": ".models",
    "VmDescription": ".models",
    "VmState": ".models",
    "run_cancellable": "._threads",
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'squibd.vm' has no attribute {name!r}")
    module = importlib.import_module(_HOMES.get(name, ".errors"), __name__)
    return getattr(module, name)
