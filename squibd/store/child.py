"""A store page-server process: ``python -m squibd.store.child`` (started ahead, used once).

The daemon cannot serve a lazily restored VM's page faults from its own
threads: a daemon thread that touches guest memory while holding the GIL
(reading guest counters, say) would wait for a fault that only a Python
thread of the same process could serve. So each lazily restored VM gets its
own page-server process. Starting Python and importing the store stack
takes about a second here, far above the 100 ms a lazy restore may take, so
the daemon keeps one such process started ahead (:class:`SpareChildren`):
it imports everything, prints ``ready``, and waits for one job line
``{"store", "config", "name", "socket"}`` on stdin; it then prints
``listening PATH`` (or ``error MESSAGE``) and serves that one VM until the
VMM closes the socket (exit 0; 1 on a corrupt or missing chunk).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
import time
from typing import IO, Any, Final

import attrs

from .config import StoreConfig
from .errors import StoreError, StoreUnavailable
from .lazy import LazyServer
from .objects import open_objects
from .store import SnapshotStore

__all__ = ["SpareChildren", "main", "serve_snapshot"]

_READY_TIMEOUT_S: Final = 60.0
_log = logging.getLogger("squibd.store")


def serve_snapshot(store_name: str, config: StoreConfig, name: str, socket_path: str,
                   out: IO[str], *, store: SnapshotStore | None = None,
                   snapshot_file: str | None = None) -> int:
    """Serve snapshot ``name`` on ``socket_path`` to one VMM; returns the exit code.

    ``snapshot_file``: the snapshot object as the daemon fetched it (saves a request).
    """
    try:
        if store is None:
            store = SnapshotStore(store_name, config, open_objects(config, create=False))
        if snapshot_file is not None:
            with open(snapshot_file, "rb") as f:
                snap = store.parse(name, f.read())
        else:
            snap = store.get_snapshot(name)
        t0 = time.monotonic()
        server = LazyServer(store, snap, socket_path)
        _log.info("page source of %r ready in %.1f ms", name, (time.monotonic() - t0) * 1000)
    except (StoreError, OSError, ValueError) as exc:
        out.write(f"error {exc}\n")
        out.flush()
        return 1
    out.write(f"listening {socket_path}\n")
    out.flush()
    stats = server.run()
    return 1 if stats is not None and stats.error else 0


def _warm_up() -> None:
    """Build what the first state decode and page source build lazily (converters)."""
    from squibd.snapshot.envelope import decode_state, encode_state
    from squibd.snapshot.minimal import minimal_manifest, minimal_x86_state, minimal_x86_vcpu

    with contextlib.suppress(Exception):
        state = minimal_x86_state(minimal_manifest(), (minimal_x86_vcpu(rip=0),))
        decode_state(encode_state(state))


def main() -> int:
    """The child's entry point (see the module docs).

    The first stdin line names the store (``{"store", "config"}``): its client is
    made and its connection opened before ``ready``; the second line is the job.
    """
    logging.basicConfig(level="INFO", stream=sys.stderr, format="store-page-server: %(message)s")
    first = sys.stdin.readline()
    if not first:
        return 0
    setup = json.loads(first)
    config = StoreConfig(**setup["config"])
    store = SnapshotStore(setup["store"], config, open_objects(config, create=False))
    with contextlib.suppress(StoreError):
        store.objects.exists("pairs/warm-up")  # opens the connection ahead
    _warm_up()
    try:
        print("ready", flush=True)
    except BrokenPipeError:
        # the daemon stopped while we were starting; nothing left to flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    line = sys.stdin.readline()
    if not line:
        return 0  # the daemon went away before using us
    job = json.loads(line)
    return serve_snapshot(setup["store"], config, job["name"], job["socket"], sys.stdout,
                          store=store, snapshot_file=job.get("snapshot_file"))


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise StoreUnavailable(f"the store page server (pid {proc.pid}) did not answer "
                               f"within {timeout:.0f} s")
    return proc.stdout.readline().strip()


class SpareChildren:
    """Keeps one store page-server process per store started ahead (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spares: dict[str, subprocess.Popen[str]] = {}

    @staticmethod
    def _spawn(store_name: str, config: StoreConfig) -> subprocess.Popen[str]:
        child = subprocess.Popen(
            [sys.executable, "-m", "squibd.store.child"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, close_fds=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert child.stdin is not None
        child.stdin.write(json.dumps({"store": store_name,
                                      "config": attrs.asdict(config)}) + "\n")
        child.stdin.flush()
        return child

    def warm(self, store_name: str, config: StoreConfig) -> None:
        """Start the spare process of ``store_name`` if there is none."""
        with self._lock:
            spare = self._spares.get(store_name)
            if spare is None or spare.poll() is not None:
                self._spares[store_name] = self._spawn(store_name, config)

    def serve(self, store_name: str, config: StoreConfig, name: str, socket_path: str, *,
              snapshot_file: str | None = None) -> subprocess.Popen[str]:
        """Hand a job to the spare; returns once it listens.

        The next spare is not started here: importing the store stack takes about a
        second of CPU, which on a small host would slow this very restore down. The
        caller calls :meth:`warm` once the restored VM runs.

        Raises:
            StoreError: the snapshot cannot be served (its message), or the child failed.
        """
        with self._lock:
            child = self._spares.pop(store_name, None)
            if child is None or child.poll() is not None:
                child = self._spawn(store_name, config)
        assert child.stdin is not None
        started = time.monotonic()
        try:
            if _readline(child, _READY_TIMEOUT_S) != "ready":
                raise StoreUnavailable("the store page server did not start")
            job: dict[str, Any] = {"name": name, "socket": socket_path,
                                   "snapshot_file": snapshot_file}
            child.stdin.write(json.dumps(job) + "\n")
            child.stdin.flush()
            ready = time.monotonic()
            answer = _readline(child, _READY_TIMEOUT_S)
            _log.info("store page server pid %d: ready after %.1f ms, listening %.1f ms later",
                      child.pid, (ready - started) * 1000, (time.monotonic() - ready) * 1000)
        except BaseException:
            child.kill()
            child.wait()
            raise
        if not answer.startswith("listening "):
            child.wait()
            raise StoreError(answer.removeprefix("error ") or "the store page server exited")
        threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()
        return child

    def close(self) -> None:
        """Stop the spare processes."""
        with self._lock:
            spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            with contextlib.suppress(OSError):
                spare.kill()
            spare.wait()


if __name__ == "__main__":
    sys.exit(main())
