"""Quiesce: pause every vCPU of a VM under one trio cancel scope (SPEC section 6).

Theory of operation. Each vCPU runs ``KVM_RUN`` in its own OS thread (a
``VcpuRunner`` of ``squibd.kvm``). To pause it, trio calls
``request_pause()``: the runner sets ``immediate_exit`` and signals the
thread, which leaves ``KVM_RUN``, parks, and calls ``on_paused(index)`` from
the vCPU thread. ``VcpuGate`` turns those calls into trio state through the
run's ``TrioToken`` (``run_sync_soon`` is the only thread-safe entry into
trio that never blocks the caller).

``quiesce`` asks every vCPU to pause and waits for all acknowledgements
inside ONE ``trio.move_on_after`` scope. If the scope expires first, every
vCPU is told to resume (the ones that parked run again; the runner drops a
pause request that was not acted on yet), and ``QuiesceTimeout`` is raised:
the VM keeps running and the caller has written nothing.

Acknowledgements carry the generation of the request they answer, so a
late ack of an abandoned quiesce can never complete a newer one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import Protocol

import attrs
import trio

from ..snapshot.errors import QuiesceTimeout

__all__ = ["PausableVcpu", "VcpuGate", "quiesce"]


class PausableVcpu(Protocol):
    """The part of ``squibd.kvm.VcpuRunner`` that quiesce needs."""

    def request_pause(self) -> None: ...

    def resume(self) -> None: ...


@attrs.define(eq=False)
class VcpuGate:
    """Trio-side pause bookkeeping for the vCPU runners of one VM.

    ``token`` is the trio run's token (``trio.lowlevel.current_trio_token()``,
    taken on the trio thread); pass ``on_paused_from_thread`` to every runner
    as its ``on_paused``.
    """

    vcpu_count: int
    _token: trio.lowlevel.TrioToken = attrs.field(repr=False)
    _runners: list[PausableVcpu] = attrs.field(init=False, factory=list, repr=False)
    _lock: threading.Lock = attrs.field(init=False, factory=threading.Lock)
    _generation: int = attrs.field(init=False, default=0)
    _acked: set[int] = attrs.field(init=False, factory=set)
    _all_acked: trio.Event = attrs.field(init=False, factory=trio.Event)

    def attach(self, runners: Sequence[PausableVcpu]) -> None:
        """Bind the runners this gate controls (index i is vCPU i)."""
        if len(runners) != self.vcpu_count:
            raise ValueError(f"expected {self.vcpu_count} runners, got {len(runners)}")
        self._runners = list(runners)

    @property
    def token(self) -> trio.lowlevel.TrioToken:
        """The trio run this gate reports into."""
        return self._token

    @property
    def paused(self) -> frozenset[int]:
        """Indices of vCPUs that acknowledged the current pause request."""
        return frozenset(self._acked)

    def on_paused_from_thread(self, index: int) -> None:
        """``on_paused`` callback for the runners; safe to call from any thread."""
        with self._lock:
            generation = self._generation
        # After the trio run is over (daemon shutdown) nobody waits for the ack.
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self._ack, index, generation)

    def _ack(self, index: int, generation: int) -> None:
        if generation != self._generation:
            return  # a late answer to an abandoned request
        self._acked.add(index)
        if len(self._acked) == self.vcpu_count:
            self._all_acked.set()

    def request_pause_all(self) -> trio.Event:
        """Start a new pause request on every vCPU; the event fires when all acked."""
        with self._lock:
            self._generation += 1
        self._acked = set()
        self._all_acked = trio.Event()
        for runner in self._runners:
            runner.request_pause()
        return self._all_acked

    def resume_all(self) -> None:
        """Let every vCPU run again and forget the current pause request."""
        with self._lock:
            self._generation += 1
        self._acked = set()
        self._all_acked = trio.Event()
        for runner in self._runners:
            runner.resume()


async def quiesce(gate: VcpuGate, timeout_s: float) -> None:
    """Pause every vCPU of ``gate``, all acknowledged within ``timeout_s``.

    Raises:
        QuiesceTimeout: some vCPU did not acknowledge in time; every vCPU was
            told to resume, so the VM keeps running.
        trio.Cancelled: the caller was cancelled; the vCPUs were resumed.
    """
    all_acked = gate.request_pause_all()
    try:
        with trio.move_on_after(timeout_s):
            await all_acked.wait()
    except BaseException:
        gate.resume_all()
        raise
    if all_acked.is_set():
        return
    missing = sorted(set(range(gate.vcpu_count)) - gate.paused)
    gate.resume_all()
    raise QuiesceTimeout(
        detail=f"vCPU(s) {missing} did not acknowledge within {timeout_s} s"
    )
