"""Running blocking work in worker threads with cooperative cancellation.

``trio.to_thread.run_sync`` cannot interrupt a thread. Long writers in
``squibd.snapshot`` take a ``threading.Event`` instead and stop at their
next chunk when it is set. ``run_cancellable`` bridges the two: when the
calling trio task is cancelled it sets the event, then waits (shielded) for
the thread to finish, so that no thread keeps writing into a file the
caller is about to remove, and only then lets ``trio.Cancelled`` through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Final, TypeVar

import outcome
import trio

__all__ = ["IO_LIMITER_TOKENS", "run_blocking", "run_cancellable"]

T = TypeVar("T")

#: Worker threads one VM runtime may use for blocking I/O at once: the
#: machine has 2 cores and KVM-NOTES measured that a second writer barely
#: helps one file, so a few threads cover I/O waits without oversubscribing.
IO_LIMITER_TOKENS: Final = 4


async def run_blocking(fn: Callable[[], T], limiter: trio.CapacityLimiter) -> T:
    """Run a short blocking call (an ioctl, a small read) in a worker thread."""
    return await trio.to_thread.run_sync(fn, limiter=limiter)


async def run_cancellable(
    fn: Callable[[threading.Event], T], limiter: trio.CapacityLimiter
) -> T:
    """Run ``fn(cancel_event)`` in a worker thread; cancellation sets the event.

    ``fn`` must return (or raise) promptly once the event is set. On
    cancellation this waits for ``fn`` to end and then raises
    ``trio.Cancelled``, unless ``fn`` had already completed successfully:
    then its result is returned and the cancel fires at the caller's next
    checkpoint. Otherwise it returns ``fn``'s result or raises its error.
    """
    cancel = threading.Event()
    result: list[outcome.Outcome[T]] = []

    async def worker() -> None:
        with trio.CancelScope(shield=True):
            result.append(
                await trio.to_thread.run_sync(outcome.capture, fn, cancel, limiter=limiter)
            )
        nursery.cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            try:
                await trio.sleep_forever()
            finally:
                # Either the worker finished (and cancelled the nursery) or the
                # caller was cancelled: both ways the thread must stop / has stopped.
                cancel.set()
    except BaseException:
        done = result[0] if result else None
        if isinstance(done, outcome.Value):
            # The work completed before the cancel reached it: its result
            # stands (a commit cannot be undone); the pending cancel fires at
            # the caller's next checkpoint.
            value: T = done.value
            return value
        raise
    return result[0].unwrap()
