"""Serve one VM's memory lazily from a snapshot store: a page server fed by a StoreSource.

:class:`LazyServer` binds a Unix socket, and in its own thread: starts the
store streaming, pre-faults the pages the vCPUs touch first (found from the
saved vCPU state), accepts one VMM (squibd's ``Uffd`` backend, or a
Firecracker VMM), and serves it until it closes the connection. Used by
``store.restore`` (lazy) in the daemon and by ``squibd --page-server --store``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from typing import cast

from squibd.snapshot.envelope import decode_state
from squibd.uffd.errors import ChunkCorrupt
from squibd.uffd.prefetch import prefetch_offsets
from squibd.uffd.server import PageServer, ServeStats
from squibd.uffd.source import PageSource

from .source import StoreSource
from .store import SnapshotStore, StoredSnapshot

__all__ = ["LazyServer"]


_log = logging.getLogger("squibd.store")


class _StreamAfterReady(PageServer):
    """A page server that starts the store's background fetching once the VM may run.

    Until then the few prefetched chunks have the network and the CPUs to themselves.
    """

    streaming: StoreSource | None = None

    def on_ready(self) -> None:
        _log.info("prefetched pages in; the VM may run")
        if self.streaming is not None:
            self.streaming.start_streaming()
            self.streaming = None


def _bind(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
    except BaseException:
        sock.close()
        raise
    return sock


class LazyServer:
    """A page server for one VM, fed by ``store`` (see the module docs)."""

    def __init__(self, store: SnapshotStore, snap: StoredSnapshot, socket_path: str, *,
                 stream: bool = True, fault_granule: int = 0) -> None:
        self.socket_path = socket_path
        self.state = decode_state(snap.state)
        self.source = StoreSource(store, snap, workers=store.workers)
        # The chunks the vCPUs need first, in parallel, while the VMM gets ready.
        self.source.start_prefetch(snap.prefetch)
        self.stats: ServeStats | None = None
        self.done = threading.Event()
        self._stream = stream
        self._fault_granule = fault_granule
        try:
            self._listener = _bind(socket_path)
        except BaseException:
            self.source.close()
            raise
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Serve in a daemon thread (returns at once)."""
        self._thread = threading.Thread(target=self.run, name="store-page-server", daemon=True)
        self._thread.start()

    def run(self) -> ServeStats | None:
        """Serve one VMM in this thread; returns the statistics (None if none connected)."""
        try:
            t0 = time.monotonic()
            memory = self.state.memory
            try:
                prefetch = prefetch_offsets(self.state.vcpu_states, memory.regions,
                                            self.source.read, self.source.page_size)
            except ChunkCorrupt as exc:
                # The vCPUs would touch it first: prefetching it again refuses the handshake.
                _log.error("%s", exc)
                prefetch = [exc.offset - exc.offset % self.source.page_size]
            walked = time.monotonic()
            server = _StreamAfterReady(
                cast(PageSource, self.source),  # the PageSource reads the server makes
                memory.regions,
                prefetch=prefetch,
                fault_granule=self._fault_granule,
                stream=self._stream,
                pair_id=memory.pair_id,
            )
            if self._stream:
                server.streaming = self.source
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return None  # stopped before a VMM came
            finally:
                self._close_listener()
            _log.info("VMM connected %.1f ms after the prefetch walk began; %d pages to "
                      "prefetch (walk %.1f ms)", (time.monotonic() - t0) * 1000, len(prefetch),
                      (walked - t0) * 1000)
            with conn:
                self.stats = server.serve(conn)
            return self.stats
        except Exception:
            _log.exception("the store page server failed")
            raise
        finally:
            self._close_listener()
            self.source.close()
            self.done.set()

    def _close_listener(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)

    def stop(self) -> None:
        """Stop waiting for a VMM (a served VMM is served until it leaves)."""
        self._close_listener()
