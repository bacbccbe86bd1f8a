"""The runtime's pool of memory-writer threads (``snapshot.memwriter.WriterThreads``).

A save's memory writer runs in a worker thread of the runtime's I/O
limiter and may start helper threads of its own. Taking them from this
pool, owned by the runtime, bounds them across concurrent saves and lets
the runtime see them (:attr:`WriterPool.active`): a writer that asks for
more threads than are free gets fewer, or none and then writes in its own
thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import attrs

__all__ = ["WriterPool"]


@attrs.define(eq=False)
class WriterPool:
    """At most ``max_threads`` memory-writer helper threads at once (any thread may call)."""

    max_threads: int
    _lock: threading.Lock = attrs.field(factory=threading.Lock, init=False, repr=False)
    _active: int = attrs.field(default=0, init=False)
    #: The most helper threads that ever ran at once (for tests and reports).
    peak: int = attrs.field(default=0, init=False)

    @property
    def active(self) -> int:
        """Helper threads running now."""
        with self._lock:
            return self._active

    def start(self, count: int, target: Callable[[], None]) -> Sequence[threading.Thread]:
        """Start ``min(count, free)`` threads running ``target``; returns them."""
        with self._lock:
            granted = max(0, min(count, self.max_threads - self._active))
            self._active += granted
            self.peak = max(self.peak, self._active)
        threads = [
            threading.Thread(
                target=self._run, args=(target,), name=f"squibd-memwriter-{i}", daemon=True
            )
            for i in range(granted)
        ]
        for thread in threads:
            thread.start()
        return threads

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            with self._lock:
                self._active -= 1
