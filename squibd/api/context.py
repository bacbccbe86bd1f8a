"""What handlers see: the daemon-wide :class:`ApiContext` and per-call :class:`CallInfo`."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import cattrs

from squibd.vm.models import DEFAULT_VM_ISOLATION

from .wire import make_wire_converter

if TYPE_CHECKING:
    from squibd.metrics import Metrics
    from squibd.store.config import StoreConfig
    from squibd.vm.runtime import Runtime
    from squibd.vmm.host import ZygoteHost

    from .firecracker import ApiSocketHost

__all__ = ["KVM_DEVICE", "ApiContext", "CallInfo", "ProgressSink"]

#: The KVM device node (Documentation/virt/kvm/api.rst).
KVM_DEVICE: Final = "/dev/kvm"

#: progress(phase, done, total), called on the trio thread.
ProgressSink = Callable[[str, int, int], None]


@attrs.define(eq=False)
class ApiContext:
    """Daemon-wide state shared by every handler.

    The VM runtime is created on first use, so that methods that need no VM
    (``daemon.status``, ``snapshot.describe``, ``snapshot.rebase``) work even
    where KVM is missing.

    Args:
        debug_api: expose ``vm.read_memory`` / ``vm.write_memory``.
        allowed_roots: if set, client paths must lie inside these directories.
        quiesce_timeout_s: passed to the runtime (SPEC section 6), ``None`` = its default.
        limits: the runtime's ``[limits]`` (``squibd.vm.limits.RuntimeLimits`` keys;
            a key left out or ``None`` keeps its default).
    """

    debug_api: bool = False
    allowed_roots: Sequence[str] | None = None
    quiesce_timeout_s: float | None = None
    limits: dict[str, int | None] = attrs.field(factory=dict)
    started_at: float = attrs.field(factory=time.monotonic)
    converter: cattrs.Converter = attrs.field(factory=make_wire_converter)
    #: Serves vm.create's ``api_socket`` (set by the server; None: not available).
    api_sockets: ApiSocketHost | None = None
    #: ``[stores.NAME]`` of the configuration (store.* methods).
    stores: dict[str, StoreConfig] = attrs.field(factory=dict)
    #: Where ``on_shutdown = "save"`` saves VMs; ``snapshot.list``'s root without allowed roots.
    state_dir: str | None = None
    #: vm_id -> the state file a VM was restored from at daemon start (``vm.describe``).
    restored_from: dict[str, str] = attrs.field(factory=dict)
    #: Prometheus metrics (``--metrics-address``); None: off.
    metrics: Metrics | None = None
    #: Runs first in :meth:`aclose` (``on_shutdown = "save"`` saves every VM there).
    shutdown_hook: Callable[[ApiContext], Awaitable[None]] | None = None
    #: Issue 11: ``[server]`` vm_isolation, state_dir, stop_vms_on_exit and the
    #: VM processes' confinement (``squibd.vmm.confine``).
    vm_isolation: str = DEFAULT_VM_ISOLATION
    stop_vms_on_exit: bool = False
    vm_confine: dict[str, Any] | None = None
    #: The zygote the daemon started before any other thread (``squibd.vmm.untraced``).
    zygote: ZygoteHost | None = None
    _runtime: Runtime | None = attrs.field(default=None, init=False)
    _started_up: bool = attrs.field(default=False, init=False)

    @property
    def runtime(self) -> Runtime:
        """The VM runtime (created on first use)."""
        if self._runtime is None:
            from squibd.vm.runtime import Runtime

            kwargs: dict[str, Any] = {}
            if self.quiesce_timeout_s is not None:
                kwargs["quiesce_timeout_s"] = self.quiesce_timeout_s
            limits = {key: value for key, value in self.limits.items() if value is not None}
            if limits:
                from squibd.vm.limits import RuntimeLimits

                kwargs["limits"] = RuntimeLimits(**limits)
            self._runtime = Runtime(
                vm_isolation=self.vm_isolation, state_dir=self.state_dir,
                stop_vms_on_exit=self.stop_vms_on_exit, confine=self.vm_confine,
                zygote=self.zygote, **kwargs,
            )  # fmt: skip
        return self._runtime

    @property
    def vm_count(self) -> int:
        """How many VMs exist (0 before the runtime was first used)."""
        return 0 if self._runtime is None else len(self._runtime.list())

    @staticmethod
    def kvm_available() -> bool:
        """Whether ``/dev/kvm`` can be opened for reading and writing."""
        return os.access(KVM_DEVICE, os.R_OK | os.W_OK)

    async def startup(self) -> None:
        """Issue 11: start the warm zygote and re-attach the VM processes of a previous daemon.

        Runs once (later calls return at once): before the VMs saved at the
        last shutdown are restored, whose VM processes it must not take for
        a previous daemon's.
        """
        if self._started_up:
            return
        self._started_up = True
        if self.vm_isolation == "process":
            await self.runtime.reattach()

    async def aclose(self) -> None:
        """Run the shutdown hook, then destroy every VM (daemon shutdown)."""
        if self.shutdown_hook is not None and self._runtime is not None:
            await self.shutdown_hook(self)
        if self._runtime is not None:
            await self._runtime.aclose()


@attrs.frozen
class CallInfo:
    """One call: its request id (``None`` for a notification) and its progress sink."""

    request_id: int | str | None
    progress: ProgressSink | None = None
