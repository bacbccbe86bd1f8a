"""The page server's accept loop: several VMMs at once, one thread each.

Theory of operation: the main thread polls the listening socket and a stop
pipe. Each accepted connection gets its own thread running
``PageServer.serve`` (its own userfaultfd and served-page state; the memory
source is shared), so a VMM never waits behind another one. A connection
beyond ``max_vms`` is refused at once: it gets an ``{"error": ...}`` line
(which a squibd VMM reports) and is closed, never left in a queue.

``stop()`` (any thread, or a signal handler) makes the stop pipe readable:
every connection thread leaves its loop and the accept loop returns once they
have. Unless ``keep_serving``, the loop also returns when the last VMM it
served is gone, so a one-shot page server exits after its VM.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import threading
from typing import Final

import attrs

from .handshake import encode_status, send_status
from .server import PageServer, ServeStats

__all__ = ["DEFAULT_MAX_VMS", "ServeLoop"]

#: VMMs served at once by default (each costs a thread and 2 bytes per guest page).
DEFAULT_MAX_VMS: Final = 64
_log = logging.getLogger("squibd.uffd")


@attrs.define(eq=False)
class ServeLoop:
    """Accepts VMMs on ``listener`` and serves each from ``server`` in its own thread.

    Args:
        server: the page server (its source is shared by every connection).
        listener: a bound, listening Unix stream socket (not closed here).
        max_vms: VMMs served at once; more are refused at once.
        keep_serving: keep accepting after the last VMM is gone (until ``stop``).
    """

    server: PageServer
    listener: socket.socket
    max_vms: int = DEFAULT_MAX_VMS
    keep_serving: bool = False
    #: Statistics of every connection that ended, in the order they ended.
    finished: list[ServeStats] = attrs.Factory(list)
    _threads: set[threading.Thread] = attrs.Factory(set)
    _lock: threading.Lock = attrs.Factory(threading.Lock)
    _stop_r: int = -1
    _stop_w: int = -1
    _wake_r: int = -1
    _wake_w: int = -1

    def __attrs_post_init__(self) -> None:
        if self.max_vms < 1:
            raise ValueError("max_vms must be at least 1")
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    @property
    def active(self) -> int:
        """VMMs being served now."""
        with self._lock:
            return len(self._threads)

    def stop(self) -> None:
        """Stop serving every VMM and return from ``run`` (safe from a signal handler)."""
        with contextlib.suppress(OSError):
            os.write(self._stop_w, b"x")

    def run(self) -> list[ServeStats]:
        """Serve until stopped (or, without ``keep_serving``, until the last VMM is gone).

        Returns the statistics of every connection served.
        """
        self.listener.setblocking(False)  # a peer that left before accept must not block us
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        served_any = False
        accepting = True
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_r in events:
                    break
                if self._wake_r in events:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    if not accepting:  # a VMM left: its descriptors are free again
                        accepting = True
                        poller.modify(self.listener, select.POLLIN)
                if accepting and self.listener.fileno() in events:
                    try:
                        served_any |= self._accept_one()
                    except OSError as exc:
                        if exc.errno not in (errno.EMFILE, errno.ENFILE) or self.active == 0:
                            raise
                        # Out of descriptors: leave new VMMs queued until one leaves.
                        _log.warning("cannot accept a VMM (%s); waiting for one to leave",
                                     exc.strerror)
                        accepting = False
                        poller.modify(self.listener, 0)
                idle = served_any and not self.keep_serving and self.active == 0
                if idle and not self._pending():
                    break
        finally:
            self.stop()  # every connection thread leaves its loop
            with self._lock:
                threads = list(self._threads)
            for thread in threads:
                thread.join()
            for fd in (self._stop_r, self._stop_w, self._wake_r, self._wake_w):
                os.close(fd)
        return self.finished

    def _pending(self) -> bool:
        """True when a VMM waits in the listener's queue (it is served before exiting)."""
        readable, _, _ = select.select([self.listener], [], [], 0)
        return bool(readable)

    def _accept_one(self) -> bool:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return False
        with self._lock:
            if len(self._threads) >= self.max_vms:
                message = (
                    f"the page server serves {self.max_vms} VMs already (its --max-vms); "
                    "start another page server for this VM"
                )
                _log.warning("refusing a VMM: %s", message)
                send_status(conn, encode_status(error=message))
                conn.close()
                return False
            thread = threading.Thread(target=self._serve, args=(conn,), name="page-server-vmm")
            self._threads.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # no more threads: refuse this VMM, serve the others
            with self._lock:
                self._threads.discard(thread)
            _log.warning("refusing a VMM: %s", exc)
            send_status(conn, encode_status(error=f"the page server cannot serve more VMs ({exc})"))
            conn.close()
            return False
        return True

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                stats = self.server.serve(conn, stop_fd=self._stop_r)
        except Exception as exc:  # an error boundary per VMM: the others keep being served
            _log.exception("serving a VMM failed")
            stats = ServeStats(error=f"internal error: {exc}", ended="internal error")
        with self._lock:
            self.finished.append(stats)
            self._threads.discard(threading.current_thread())
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
