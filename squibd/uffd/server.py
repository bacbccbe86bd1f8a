"""The page server: serves one VMM's guest memory faults from a memory source.

Theory of operation
-------------------
One connection is one VM (``PageServer.serve``; ``listener.ServeLoop`` runs
one thread per connection, so a server serves several VMMs at once, each with
its own userfaultfd and served-page state over one shared source). After the
handshake (regions + userfaultfd, taken within ``handshake_timeout``) the
server checks that the VM's layout is the snapshot's, pre-faults the pages
the vCPUs touch first (a few pages: well under a millisecond), answers
``{"ready": true}`` when the VMM asked for status lines (a squibd extension
Firecracker ignores), then loops:

1. read every pending userfaultfd event without blocking; page faults are
   served at once (demand first), remove events mark their pages as removed
   (a later fault there gets a zero page, as after ``MADV_DONTNEED``);
2. install one 2 MiB block of not-yet-served pages, in memory-file order
   (background streaming), then go back to 1;
3. once everything is streamed, block in ``poll`` until a fault, the VMM
   going away, or the server stopping.

The VMM is gone when its process exits (a pidfd of the peer from
``SO_PEERCRED``; where none can be had, a periodic probe of a served page,
which fails with ``ESRCH`` once its address space is gone), when an install
fails with ``ESRCH``, or, for a VMM that asked for status lines (squibd's),
when it closes the socket. A VMM that did not ask may close the socket right
after the handshake (Firecracker v1.7 to v1.11 do): serving goes on.

Pages come from a ``MemorySource``. Data pages are installed with
``UFFDIO_COPY``, holes and removed pages with ``UFFDIO_ZEROPAGE``. ``EEXIST``
means the page is already there (two vCPUs faulted it, or streaming got there
first): it counts as served. ``EAGAIN`` means the address space is changing:
events are read and the range retried. A chunk that fails its digest stops
serving that VM: it logs the offset, tells the VMM why, and closes the
connection; the faulting vCPUs stay blocked because the VMM keeps its
userfaultfd open.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Iterator, Sequence
from typing import Final

import attrs
import numpy as np
import numpy.typing as npt

from squibd.snapshot.manifest import MemoryRegion

from . import _abi
from .errors import ChunkCorrupt, HandshakeInvalid
from .handshake import RegionMapping, encode_status, receive_handshake, send_status
from .source import HOLE, MemorySource
from .userfaultfd import Userfaultfd

__all__ = ["DEFAULT_SERVER_HANDSHAKE_TIMEOUT_S", "STREAM_CHUNK", "PageServer", "ServeStats"]

#: Background streaming unit (issue 7: "the rest in 2 MiB chunks").
STREAM_CHUNK: Final = 2 * 1024 * 1024
#: Streaming installs a block in slices of this size, serving faults in between
#: (256 KiB: about 0.2 ms of UFFDIO_COPY here, see bench/uffd.py).
STREAM_SLICE: Final = 256 * 1024
#: Marks pages already served in the per-block segment computation.
_SERVED: Final = -2
_POLL_FOREVER: Final = -1
#: Seconds a connected VMM has to send its handshake before it is dropped.
DEFAULT_SERVER_HANDSHAKE_TIMEOUT_S: Final = 10.0
#: Without a pidfd of a VMM that closed its socket, how often (ms) its liveness is probed.
_PROBE_INTERVAL_MS: Final = 2000
#: What /proc/self/fd/N links to for a userfaultfd (fs/userfaultfd.c: anon inode name).
_UFFD_LINK: Final = "anon_inode:[userfaultfd]"
#: struct ucred { pid_t pid; uid_t uid; gid_t gid; } (linux/socket.h)
_UCRED: Final = struct.Struct("iII")
_log = logging.getLogger("squibd.uffd")


def _check_is_userfaultfd(fd: int) -> None:
    """Refuse another kind of descriptor (a file, a pipe) passed as the userfaultfd."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return  # no /proc: the first ioctl will tell
    if target != _UFFD_LINK:
        raise HandshakeInvalid(f"the descriptor sent is not a userfaultfd ({target})")


def _peer_pidfd(sock: socket.socket) -> tuple[int, int]:
    """(pid, pidfd) of the process at the other end of ``sock``; pidfd -1 when none
    can be had (a peer in another pid namespace, an old kernel)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        pid = int(_UCRED.unpack(raw)[0])
    except OSError:
        return 0, -1
    if pid <= 0:
        return pid, -1
    try:
        return pid, os.pidfd_open(pid)
    except (OSError, AttributeError):
        return pid, -1


@attrs.define
class ServeStats:
    """What one connection was served (for logs, tests and benchmarks)."""

    faults: int = 0
    #: Pages installed as zero pages (holes of the chain, removed pages).
    zero_pages: int = 0
    prefetched_pages: int = 0
    streamed_bytes: int = 0
    already_present: int = 0
    removed_pages: int = 0
    streaming_done: bool = False
    #: Why serving stopped early (corrupt chunk, bad handshake), None when the VMM left.
    error: str | None = None
    #: The VMM's process id (SO_PEERCRED), 0 when unknown.
    vmm_pid: int = 0
    #: True when the VMM closed its socket and serving went on (Firecracker v1.7-v1.11).
    socket_closed_early: bool = False
    #: Why serving ended: the VMM left (how), the server stopped, or the error.
    ended: str = ""


@attrs.define(eq=False)
class _Connection:
    """Serving state of one VMM."""

    uffd: Userfaultfd
    sock: socket.socket
    regions: tuple[RegionMapping, ...]  # sorted by offset
    bases: list[int]  # region index -> base_host_virt_addr, in host-address order
    by_base: list[RegionMapping]
    served: npt.NDArray[np.bool_]
    removed: npt.NDArray[np.bool_]
    wants_status: bool
    pidfd: int = -1
    stats: ServeStats = attrs.Factory(ServeStats)
    vmm_gone: bool = False
    sock_open: bool = True


@attrs.define(eq=False)
class PageServer:
    """Serves guest memory faults from ``source`` (see the module docs).

    Args:
        source: the memory served (shared by every connection).
        regions: the manifest's regions (the VM's layout must equal them); None when
            there is no manifest (a Firecracker pair): any layout inside the source
            is taken from the handshake.
        prefetch: memory-file offsets of pages to install right after the handshake.
        fault_granule: bytes installed per demand fault (a multiple of the page size).
        stream: stream the rest of memory in the background.
        pair_id: the newest snapshot's pair id, told to the VMM in the ready line.
        handshake_timeout: seconds a connected VMM has to send the handshake.
    """

    source: MemorySource
    regions: tuple[MemoryRegion, ...] | None
    prefetch: Sequence[int] = ()
    fault_granule: int = 0
    stream: bool = True
    #: Pair id of the newest snapshot served, sent in the ready line (None: not sent).
    pair_id: str | None = None
    handshake_timeout: float | None = DEFAULT_SERVER_HANDSHAKE_TIMEOUT_S

    def __attrs_post_init__(self) -> None:
        page = self.source.page_size
        if self.fault_granule == 0:
            self.fault_granule = page
        if self.fault_granule % page:
            raise ValueError(f"fault granule {self.fault_granule} is not a multiple of {page}")

    # --- connection setup -----------------------------------------------------
    def _accept(self, sock: socket.socket) -> _Connection:
        # The peer's pidfd first: a VMM that exits right after its handshake is still seen.
        pid, pidfd = _peer_pidfd(sock)
        try:
            handshake = receive_handshake(sock, timeout=self.handshake_timeout)
        except BaseException:
            if pidfd >= 0:
                os.close(pidfd)
            raise
        uffd = Userfaultfd.adopt(handshake.uffd)
        try:
            _check_is_userfaultfd(handshake.uffd)
            os.set_blocking(handshake.uffd, False)
            self._check_layout(handshake.regions)
            sock.setblocking(False)
        except BaseException:
            uffd.close()
            if pidfd >= 0:
                os.close(pidfd)
            raise
        regions = handshake.regions
        by_base = sorted(regions, key=lambda r: r.base_host_virt_addr)
        pages = self.source.size // self.source.page_size
        conn = _Connection(
            uffd=uffd,
            sock=sock,
            regions=tuple(sorted(regions, key=lambda r: r.offset)),
            bases=[r.base_host_virt_addr for r in by_base],
            by_base=by_base,
            served=np.zeros(pages, dtype=np.bool_),
            removed=np.zeros(pages, dtype=np.bool_),
            wants_status=handshake.wants_status,
            pidfd=pidfd,
        )
        conn.stats.vmm_pid = max(pid, 0)
        return conn

    def _check_layout(self, regions: Sequence[RegionMapping]) -> None:
        page = self.source.page_size
        for region in regions:
            if region.page_size != page:
                raise HandshakeInvalid(
                    f"the VM uses {region.page_size}-byte pages; this page server serves "
                    f"{page}-byte pages only"
                )
        theirs = sorted((r.offset, r.size) for r in regions)
        if self.regions is not None:
            ours = sorted((r.file_offset, r.size) for r in self.regions)
            if theirs != ours:
                raise HandshakeInvalid(
                    f"the VM's memory layout {theirs} (offset, size) differs from the "
                    f"snapshot's {ours}"
                )
            return
        end = 0
        for offset, size in theirs:  # no manifest: the layout must fit the memory file
            if offset % page or size % page or size == 0:
                raise HandshakeInvalid(f"region at offset {offset:#x} is not page aligned")
            if offset < end:
                raise HandshakeInvalid(f"regions overlap at memory-file offset {offset:#x}")
            end = offset + size
        if end > self.source.size:
            raise HandshakeInvalid(
                f"the VM's memory ({end} bytes of memory file) is larger than the memory "
                f"file ({self.source.size} bytes)"
            )

    def serve(self, sock: socket.socket, *, stop_fd: int = -1) -> ServeStats:
        """Take the handshake on ``sock`` and serve that VM until it is gone.

        Returns the statistics; ``stats.error`` says why serving stopped early.
        ``stop_fd`` (readable = stop) ends serving from another thread. Closes
        nothing it did not open except the received userfaultfd.
        """
        try:
            conn = self._accept(sock)
        except HandshakeInvalid as exc:
            _log.error("refusing the handshake: %s", exc)
            send_status(sock, encode_status(error=str(exc)))
            return ServeStats(error=str(exc), ended=f"refused: {exc}")
        _log.info("serving VMM pid %s", conn.stats.vmm_pid or "unknown")
        try:
            self._prefetch(conn)
            if conn.wants_status:
                send_status(sock, encode_status(ready=True, pair_id=self.pair_id))
            self.on_ready()
            self._run(conn, stop_fd)
        except ChunkCorrupt as exc:
            _log.error("%s (file offset %#x); stopping: the VM must not run on it", exc, exc.offset)
            conn.stats.error = str(exc)
            conn.stats.ended = f"stopped: {exc}"
            send_status(sock, encode_status(error=str(exc)))
        finally:
            conn.uffd.close()
            if conn.pidfd >= 0:
                os.close(conn.pidfd)
        _log.info("done with VMM pid %s (%s): %s", conn.stats.vmm_pid or "unknown",
                  conn.stats.ended, conn.stats)
        return conn.stats

    def on_ready(self) -> None:
        """Called when a VM's prefetched pages are in and it may run (a hook; no-op)."""

    # --- the loop ---------------------------------------------------------------
    def _prefetch(self, conn: _Connection) -> None:
        page = self.source.page_size
        for offset in self.prefetch:
            conn.stats.prefetched_pages += self._install(conn, offset // page, 1)

    def _run(self, conn: _Connection, stop_fd: int) -> None:
        page = self.source.page_size
        poller = select.poll()
        poller.register(conn.uffd.fd, select.POLLIN)
        poller.register(conn.sock, select.POLLIN)
        if conn.pidfd >= 0:
            poller.register(conn.pidfd, select.POLLIN)
        if stop_fd >= 0:
            poller.register(stop_fd, select.POLLIN)
        cursor = 0 if self.stream else self.source.size
        block_pages = STREAM_CHUNK // page
        slice_pages = max(1, STREAM_SLICE // page)
        total_pages = self.source.size // page
        while not conn.vmm_gone:
            probing = not conn.sock_open and conn.pidfd < 0
            if cursor < self.source.size:
                timeout = 0
            else:
                timeout = _PROBE_INTERVAL_MS if probing else _POLL_FOREVER
            ready = poller.poll(timeout)
            for fd, _mask in ready:
                if fd == stop_fd:
                    conn.stats.ended = "the page server stopped"
                    return
                if fd == conn.pidfd:
                    self._gone(conn, f"its process (pid {conn.stats.vmm_pid}) exited")
                elif conn.sock_open and fd == conn.sock.fileno() and self._socket_closed(conn):
                    poller.unregister(conn.sock)
            if probing and not ready:
                self._probe(conn)
            if conn.vmm_gone:
                break
            self._drain(conn)
            if cursor < self.source.size:
                first = cursor // page
                count = min(block_pages, total_pages - first)
                # The block goes in slices with pending faults served in between, so a
                # demand fault waits for at most one slice, never a whole block.
                for start in range(first, first + count, slice_pages):
                    stop = min(start + slice_pages, first + count)
                    conn.stats.streamed_bytes += self._install(conn, start, stop - start) * page
                    self._drain(conn)
                    if conn.vmm_gone:
                        return
                cursor += count * page
                if cursor >= self.source.size:
                    conn.stats.streaming_done = True
                    _log.info("background streaming done")

    @staticmethod
    def _gone(conn: _Connection, how: str) -> None:
        if not conn.vmm_gone:
            conn.vmm_gone = True
            conn.stats.ended = f"the VMM is gone: {how}"

    @staticmethod
    def _socket_closed(conn: _Connection) -> bool:
        """Read what the VMM sent (nothing is expected); True once its end is closed."""
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if data:
            return False
        conn.sock_open = False
        if conn.wants_status:  # squibd's VMM keeps the socket while the VM lives
            PageServer._gone(conn, "it closed the connection")
        else:
            conn.stats.socket_closed_early = True
            _log.info(
                "VMM pid %s closed its socket after the handshake (as Firecracker v1.7-v1.11 "
                "do); serving on until its process exits",
                conn.stats.vmm_pid or "unknown",
            )
        return True

    def _probe(self, conn: _Connection) -> None:
        """No pidfd: re-install a served page; ESRCH means the VMM's memory is gone."""
        served = np.flatnonzero(conn.served)
        if not len(served):
            return
        page = self.source.page_size
        offset = int(served[0]) * page
        for region in conn.regions:
            if region.offset <= offset < region.offset + region.size:
                dst = region.base_host_virt_addr + offset - region.offset
                _done, err = conn.uffd.zeropage(dst, page)
                if err == errno.ESRCH:
                    self._gone(conn, "its address space is gone")
                return

    def _drain(self, conn: _Connection) -> None:
        """Serve every pending event now (faults first, before any streaming)."""
        while True:
            try:
                events = conn.uffd.read_events()
            except OSError as exc:
                _log.warning("reading userfaultfd events failed: %s", exc)
                self._gone(conn, f"reading its userfaultfd failed ({exc.strerror or exc})")
                return
            if not events:
                return
            for event, word0, word1 in events:
                if event == _abi.UFFD_EVENT_PAGEFAULT:
                    self._on_fault(conn, word1)
                elif event == _abi.UFFD_EVENT_REMOVE:
                    self._on_remove(conn, word0, word1)

    def _locate(self, conn: _Connection, address: int) -> tuple[RegionMapping, int] | None:
        index = bisect.bisect_right(conn.bases, address) - 1
        if index < 0:
            return None
        region = conn.by_base[index]
        if address >= region.base_host_virt_addr + region.size:
            return None
        return region, address - region.base_host_virt_addr

    def _on_fault(self, conn: _Connection, address: int) -> None:
        located = self._locate(conn, address)
        if located is None:
            _log.warning("fault at %#x outside every registered region", address)
            return
        region, in_region = located
        conn.stats.faults += 1
        page = self.source.page_size
        if self.fault_granule == page:  # the common case, kept short: one page
            index = (region.offset + in_region) // page
            if conn.served[index]:
                conn.stats.already_present += 1
                conn.uffd.wake(address - address % page, page)
                return
            layer = HOLE if conn.removed[index] else int(self.source.layer_of_page[index])
            if not self._place(conn, address - address % page, index * page, page, layer):
                conn.uffd.wake(address - address % page, page)
            return
        start = in_region - in_region % self.fault_granule
        stop = min(start + self.fault_granule, region.size)
        first = (region.offset + start) // page
        count = (stop - start) // page
        # Install the whole granule without waking, then wake the faulting thread: it
        # resumes only once every page of its granule is in place.
        self._install(conn, first, count, wake=False)
        conn.uffd.wake(region.base_host_virt_addr + start, stop - start)

    def _on_remove(self, conn: _Connection, start: int, end: int) -> None:
        page = self.source.page_size
        for region in conn.regions:
            lo = max(start, region.base_host_virt_addr)
            hi = min(end, region.base_host_virt_addr + region.size)
            if lo < hi:
                first = (region.offset + lo - region.base_host_virt_addr) // page
                last = (region.offset + hi - region.base_host_virt_addr + page - 1) // page
                conn.served[first:last] = False
                conn.removed[first:last] = True
                conn.stats.removed_pages += last - first

    # --- installing pages ---------------------------------------------------------
    def _segments(
        self, conn: _Connection, first: int, count: int
    ) -> Iterator[tuple[int, int, int]]:
        """(first, count, layer) runs of the pages not yet served; removed pages are holes."""
        if count == 1:
            if not conn.served[first]:
                yield first, 1, HOLE if conn.removed[first] else int(
                    self.source.layer_of_page[first]
                )
            return
        stop = first + count
        kinds = self.source.layer_of_page[first:stop].astype(np.int16)
        kinds[conn.removed[first:stop]] = HOLE
        kinds[conn.served[first:stop]] = _SERVED
        changes = np.flatnonzero(np.diff(kinds)) + 1
        starts = [0, *changes.tolist()]
        ends = [*changes.tolist(), count]
        for lo, hi in zip(starts, ends, strict=True):
            kind = int(kinds[lo])
            if kind != _SERVED:
                yield first + lo, hi - lo, kind

    def _install(self, conn: _Connection, first: int, count: int, *, wake: bool = True) -> int:
        """Install the unserved pages of ``[first, first+count)``; returns pages installed."""
        installed = 0
        page = self.source.page_size
        for seg_first, seg_count, layer in list(self._segments(conn, first, count)):
            offset, end = seg_first * page, (seg_first + seg_count) * page
            for region in conn.regions:
                lo = max(offset, region.offset)
                hi = min(end, region.offset + region.size)
                if lo < hi:
                    dst = region.base_host_virt_addr + lo - region.offset
                    installed += self._place(conn, dst, lo, hi - lo, layer, wake=wake)
        return installed

    def _place(
        self, conn: _Connection, dst: int, offset: int, length: int, layer: int, *,
        wake: bool = True,
    ) -> int:
        """Copy (or zero) one run at ``dst``; returns pages newly installed."""
        page = self.source.page_size
        src = 0 if layer == HOLE else self.source.source_address(layer, offset, length)
        installed = 0
        while length > 0:
            if layer == HOLE:
                done, err = conn.uffd.zeropage(dst, length, wake=wake)
            else:
                done, err = conn.uffd.copy(dst, src, length, wake=wake)
            if done:
                first = offset // page
                conn.served[first : first + done // page] = True
                installed += done // page
                if layer == HOLE:
                    conn.stats.zero_pages += done // page
                dst, src, offset, length = dst + done, src + done, offset + done, length - done
            if err == 0 or length == 0:
                break
            if err == errno.EEXIST:
                conn.served[offset // page] = True
                conn.stats.already_present += 1
                dst, src, offset, length = dst + page, src + page, offset + page, length - page
            elif err == errno.EAGAIN:
                if not done:
                    self._drain_removes_only(conn)
                    if conn.removed[offset // page] and layer != HOLE:
                        return installed  # now a removed page: a later fault zero-fills it
            elif err in (errno.ENOENT, errno.ESRCH):
                if err == errno.ESRCH:
                    self._gone(conn, "its address space is gone (ESRCH)")
                return installed  # the mapping or the VMM is gone
            else:
                raise OSError(err, f"installing {length} bytes at {dst:#x}: {os.strerror(err)}")
        return installed

    def _drain_removes_only(self, conn: _Connection) -> None:
        """Read events during an EAGAIN: removes apply now, faults are served after."""
        try:
            events = conn.uffd.read_events()
        except OSError:
            return
        faults: list[int] = []
        for event, word0, word1 in events:
            if event == _abi.UFFD_EVENT_REMOVE:
                self._on_remove(conn, word0, word1)
            elif event == _abi.UFFD_EVENT_PAGEFAULT:
                faults.append(word1)
        for address in faults:
            self._on_fault(conn, address)
