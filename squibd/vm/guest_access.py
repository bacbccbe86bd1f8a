"""Guest memory access that can never stall the trio thread.

Theory of operation
-------------------
Guest memory may be backed by userfaultfd (a lazy restore): touching a page
the page server has not served blocks the touching thread until it is
served, possibly forever if the page server stalls. And a touch from Python
code that holds the GIL (``bytes(memoryview)``) would block every thread
of the daemon, the trio thread included. So:

- every access goes through :class:`GuestAccess`, from a worker thread,
  with ``ctypes.memmove`` (a foreign call: it releases the GIL while it
  copies, KVM-NOTES "userfaultfd");
- :class:`GuestAccess` counts the threads inside guest memory so that the
  VM's teardown unmaps only once none is left (an unmap under a blocked
  access would turn its wake-up into a SIGSEGV of the daemon);
- :class:`Populator` faults in all of a lazy VM's memory before a Full
  save (``MADV_POPULATE_READ``, GIL released) while watching that the page
  server makes progress: the memory writer's scans and hashes may hold the
  GIL, so they must only ever meet pages that are present. A page server
  that serves nothing for ``stall_s`` fails the save with a clear error
  before anything is written;
- :class:`ProgressProbe` reads the guest program's progress counters for
  ``vm.describe``/``vm.list`` in at most ONE thread per VM at a time, waits
  for it at most ``timeout_s``, and otherwise answers the last value it
  knows, flagged stale. A read that was stuck completes (and refreshes the
  last value) when the page is served, or when the VM is torn down.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Final

import attrs
import trio

from ..uffd._abi import UFFDIO_RANGE_STRUCT, UFFDIO_UNREGISTER
from .errors import GuestMemoryUnavailable, WrongVmState
from .memory import GuestMemory

__all__ = [
    "GuestAccess",
    "Populator",
    "ProgressProbe",
    "ProgressReading",
    "release_lazy_pages",
]

#: Progress counters are little-endian u64 (the guest programs of squibd.kvm).
_U64: Final = struct.Struct("<Q")

_log = logging.getLogger(__name__)

#: madvise(2) advice that read-faults a range in (Linux 5.14, uapi/asm-generic/mman-common.h).
_MADV_POPULATE_READ: Final = 22
#: Populate in steps of this size: progress is visible between them.
_POPULATE_STEP: Final = 16 * 1024 * 1024
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


def release_lazy_pages(uffd_fd: int, memory: GuestMemory) -> None:
    """Unregister ``memory`` from the userfaultfd ``uffd_fd``: wakes every thread waiting
    for a page the page server never served (the page then reads as zeros).

    Only for a VM being torn down (its vCPUs were told to stop). Closing our
    fd is not enough: the page server holds a duplicate of the userfaultfd,
    and the kernel wakes waiters only when the last one closes.
    """
    for region in memory.regions:
        request = bytearray(UFFDIO_RANGE_STRUCT.pack(region.host_addr, region.size))
        try:
            fcntl.ioctl(uffd_fd, UFFDIO_UNREGISTER, request)
        except OSError as exc:  # e.g. already unregistered: nothing waits there
            _log.debug(
                "UFFDIO_UNREGISTER of %#x failed: %s", region.host_addr,
                errno.errorcode.get(exc.errno or 0, exc),
            )  # fmt: skip


@attrs.define(eq=False)
class GuestAccess:
    """Reads and writes of one VM's guest memory (blocking: worker threads only)."""

    vm_id: str
    memory: GuestMemory
    _cond: threading.Condition = attrs.field(factory=threading.Condition, init=False)
    _active: int = attrs.field(default=0, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    @contextlib.contextmanager
    def _inside(self) -> Iterator[None]:
        with self._cond:
            if self._closed:
                raise WrongVmState(self.vm_id, "destroyed", "access the memory of")
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    def read(self, guest_addr: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``guest_addr`` (blocks while a lazy page is missing).

        Raises:
            GuestAddressError: the range is not inside one region.
            WrongVmState: the VM is being destroyed.
        """
        region = self.memory.region_at(guest_addr, length)
        buffer = ctypes.create_string_buffer(length)
        with self._inside():
            ctypes.memmove(buffer, region.host_addr + (guest_addr - region.guest_addr), length)
        return buffer.raw

    def write(self, guest_addr: int, data: bytes) -> None:
        """Write ``data`` at ``guest_addr`` (the caller marks the pages dirty)."""
        region = self.memory.region_at(guest_addr, len(data))
        with self._inside():
            ctypes.memmove(region.host_addr + (guest_addr - region.guest_addr), data, len(data))

    def populate(self, step_done: Callable[[int], None], cancel: threading.Event) -> None:
        """Read-fault every page in, calling ``step_done(bytes)`` after each step.

        Blocking (a lazy page waits for its page server); stops at the next
        step once ``cancel`` is set.
        """
        scratch: ctypes.Array[ctypes.c_char] | None = None
        with self._inside():
            for region in self.memory.regions:
                for offset in range(0, region.size, _POPULATE_STEP):
                    if cancel.is_set():
                        return
                    length = min(_POPULATE_STEP, region.size - offset)
                    address = region.host_addr + offset
                    while _libc.madvise(address, length, _MADV_POPULATE_READ) != 0:
                        err = ctypes.get_errno()
                        if err == errno.EINTR:
                            continue
                        if err != errno.EINVAL:
                            raise OSError(err, os.strerror(err))
                        # A kernel before 5.14: copy the step out instead (GIL released too).
                        scratch = scratch or ctypes.create_string_buffer(_POPULATE_STEP)
                        ctypes.memmove(scratch, address, length)
                        break
                    step_done(length)

    def read_u64s(self, addrs: Sequence[int]) -> list[int]:
        """Little-endian u64 values at ``addrs``."""
        return [_U64.unpack(self.read(addr, _U64.size))[0] for addr in addrs]

    @property
    def active(self) -> int:
        """Threads inside guest memory now."""
        with self._cond:
            return self._active

    def close(self, timeout_s: float) -> bool:
        """Refuse new accesses; wait up to ``timeout_s`` for those inside (True: none left)."""
        with self._cond:
            self._closed = True
            return self._cond.wait_for(lambda: self._active == 0, timeout_s)


@attrs.frozen
class ProgressReading:
    """The guest's progress counters as ``vm.describe`` reports them.

    ``values`` is None when no read ever completed; ``stale`` is True when
    ``values`` does not come from a read made for this answer.
    """

    values: list[int] | None
    stale: bool


@attrs.define(eq=False)
class _Read:
    started: float
    done: trio.Event = attrs.field(factory=trio.Event)
    values: list[int] | None = None


@attrs.define(eq=False)
class ProgressProbe:
    """Bounded reads of a VM's progress counters (trio side; see the module doc)."""

    access: GuestAccess
    addrs: tuple[int, ...]
    token: trio.lowlevel.TrioToken
    #: The values of the last read that completed.
    last: list[int] | None = None
    _pending: _Read | None = attrs.field(default=None, init=False)

    def cached(self) -> ProgressReading:
        """The last known values without reading (stale unless there is nothing to read)."""
        if not self.addrs:
            return ProgressReading([], False)
        return ProgressReading(None if self.last is None else list(self.last), True)

    async def read(self, timeout_s: float) -> ProgressReading:
        """Fresh values if a read started for this call completes within ``timeout_s``."""
        if not self.addrs:
            return ProgressReading([], False)
        called_at = trio.current_time()
        deadline = called_at + timeout_s
        while True:
            pending = self._pending if self._pending is not None else self._start()
            with trio.move_on_at(deadline):
                await pending.done.wait()
            if not pending.done.is_set():
                return self.cached()
            if pending.started >= called_at and pending.values is not None:
                return ProgressReading(list(pending.values), False)
            if pending.values is None or trio.current_time() >= deadline:
                return self.cached()  # the read failed, or no time left for another
            # A read begun before this call answered: read once more.

    def _start(self) -> _Read:
        read = _Read(started=trio.current_time())
        self._pending = read
        thread = threading.Thread(
            target=self._run, args=(read,), name=f"progress-{self.access.vm_id}", daemon=True
        )
        thread.start()
        return read

    def _run(self, read: _Read) -> None:
        values: list[int] | None
        try:
            values = self.access.read_u64s(self.addrs)
        except Exception:  # the VM is being destroyed: nothing to report
            values = None
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self._complete, read, values)

    def _complete(self, read: _Read, values: list[int] | None) -> None:
        read.values = values
        if values is not None:
            self.last = values
        if self._pending is read:
            self._pending = None
        read.done.set()


@attrs.define(eq=False)
class Populator:
    """Faults a lazy VM's memory in before a save, bounded by page-server progress.

    At most one population runs per VM: a thread stuck on a page nobody
    serves stays until the page is served or the VM is torn down (which
    releases the pages), and a save meanwhile is refused at once.
    """

    access: GuestAccess
    token: trio.lowlevel.TrioToken
    _running: bool = attrs.field(default=False, init=False)

    async def run(self, stall_s: float) -> None:
        """Populate everything; fail if no step completes within ``stall_s``.

        Raises:
            GuestMemoryUnavailable: the page server made no progress in time
                (or a population of this VM is still stuck).
            OSError: madvise failed (e.g. ENOMEM).
        """
        if self._running:
            raise GuestMemoryUnavailable(self.access.vm_id, stall_s)
        self._running = True
        cancel = threading.Event()
        news = [trio.Event()]
        outcome: list[BaseException | None] = []

        def step_done(_length: int) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(lambda: news[0].set())

        def finished(error: BaseException | None) -> None:
            self._running = False
            outcome.append(error)
            news[0].set()

        def work() -> None:
            error: BaseException | None = None
            try:
                self.access.populate(step_done, cancel)
            except Exception as exc:
                error = exc
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(finished, error)

        threading.Thread(target=work, name=f"populate-{self.access.vm_id}", daemon=True).start()
        try:
            while not outcome:
                with trio.move_on_after(stall_s) as scope:
                    await news[0].wait()
                if scope.cancelled_caught:
                    raise GuestMemoryUnavailable(self.access.vm_id, stall_s)
                news[0] = trio.Event()
        finally:
            cancel.set()  # the thread stops at its next step, if it ever gets there
        error = outcome[0]
        if error is not None:
            raise error
