"""The VMM side of the ``exiter`` guest's work port: a tiny device model in Python.

Theory of operation
-------------------
The ``exiter`` guest program (:mod:`squibd.kvm.programs`) writes one byte to
:data:`~squibd.kvm.programs.WORK_PORT` per iteration: the size of its
request in work units. The vCPU thread that took the exit calls
:meth:`WorkDevice.handle` (through the runner's ``io_handler``), which does
that much pure-Python work (a unit is :data:`ROUNDS_PER_UNIT` rounds of a
64-bit LCG over the device's state, well under a microsecond here) while holding
the GIL, as a device model written in Python would; only then does the
guest's ``OUT`` complete. So the guest's progress is bounded by the exit
cost plus this work, and several vCPUs in one Python process share one GIL
for it (``bench/vm_scaling.py`` measures what that costs).

The device's state (requests handled, units done, the LCG state) is
updated under a lock, so several vCPUs of one VM may share a device; the
work itself runs outside the lock.
"""

from __future__ import annotations

import threading
from typing import Final

import attrs

__all__ = ["ROUNDS_PER_UNIT", "WorkDevice", "work"]

#: LCG rounds per work unit (Knuth's MMIX constants, modulo 2**64).
ROUNDS_PER_UNIT: Final = 8
_MULTIPLIER: Final = 6364136223846793005
_INCREMENT: Final = 1442695040888963407
_MASK: Final = (1 << 64) - 1


def work(units: int, state: int) -> int:
    """``units`` units of work on ``state``: the new state (pure Python, holds the GIL)."""
    for _ in range(units * ROUNDS_PER_UNIT):
        state = (state * _MULTIPLIER + _INCREMENT) & _MASK
    return state


@attrs.define(eq=False)
class WorkDevice:
    """Answers ``exiter`` work requests; see the module doc."""

    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False)
    _requests: int = attrs.field(default=0, init=False)
    _units: int = attrs.field(default=0, init=False)
    _state: int = attrs.field(default=1, init=False)

    @property
    def requests(self) -> int:
        """Work requests handled so far."""
        with self._lock:
            return self._requests

    @property
    def units(self) -> int:
        """Work units done so far."""
        with self._lock:
            return self._units

    @property
    def state(self) -> int:
        """The device's state (depends on every request handled so far)."""
        with self._lock:
            return self._state

    def handle(self, data: bytes) -> None:
        """One request (an ``OUT`` of ``data`` to the work port): its first byte is its size.

        Called on a vCPU thread; the guest's ``OUT`` completes when it returns.
        An empty write (not something the ``exiter`` does) counts as a request of
        size 0.
        """
        units = data[0] if data else 0
        with self._lock:
            start = self._state
        done = work(units, start)
        with self._lock:
            self._requests += 1
            self._units += units
            self._state = (self._state + done) & _MASK  # commutes: vCPUs may interleave
