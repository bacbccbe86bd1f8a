"""Prometheus metrics on an opt-in HTTP listener (``--metrics-address HOST:PORT``).

Theory of operation: :class:`Metrics` owns a private registry. The API
dispatcher wraps every call in :meth:`Metrics.timed` (on the trio thread):
it counts the call by method and outcome, observes its latency, and for
``snapshot.create``/``load``/``rebase`` the duration, bytes and guest pause
time their results report; after each call it refreshes the VMs-by-state
gauge. The connection gauge reads the server's counter at scrape time.
prometheus-client's HTTP server runs in its own daemon thread and only
reads the registry, so nothing blocks the trio thread.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from squibd.api.context import ApiContext

__all__ = ["Metrics", "parse_address"]

T = TypeVar("T")

_VM_STATES: Final = ("NotStarted", "Running", "Paused")
_SNAPSHOT_OPS: Final = {"snapshot.create": "create", "snapshot.load": "load",
                        "snapshot.rebase": "rebase"}  # fmt: skip
_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                           1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)  # fmt: skip
_PAUSE_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                         0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # fmt: skip
_MS: Final = 1000.0


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) -> ``(host, port)``.

    Raises:
        ValueError: not HOST:PORT.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class Metrics:
    """squibd's metrics and their HTTP exporter."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("squibd_requests", "JSON-RPC calls answered, by method and "
                                "outcome (ok, cancelled, or the error kind)",
                                ("method", "outcome"), registry=r)  # fmt: skip
        self.latency = Histogram("squibd_request_duration_seconds", "JSON-RPC call latency",
                                 ("method",), buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.snapshot_duration = Histogram(
            "squibd_snapshot_duration_seconds", "snapshot create/load/rebase duration",
            ("operation",), buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.snapshot_bytes = Counter("squibd_snapshot_bytes", "bytes written by snapshot.create "
                                      "and snapshot.rebase, restored by snapshot.load",
                                      ("operation",), registry=r)  # fmt: skip
        self.pause = Histogram("squibd_pause_seconds", "guest pause time of snapshot.create",
                               buckets=_PAUSE_BUCKETS, registry=r)  # fmt: skip
        self.vms = Gauge("squibd_vms", "VMs by state", ("state",), registry=r)
        self.connections = Gauge("squibd_connections", "open client connections", registry=r)
        for state in _VM_STATES:
            self.vms.labels(state).set(0)
        self._http: Any = None

    def watch_connections(self, count: Callable[[], int]) -> None:
        """Read the connection count from ``count`` at scrape time."""
        self.connections.set_function(lambda: float(count()))

    def serve(self, address: str) -> tuple[str, int]:
        """Start the HTTP listener on ``HOST:PORT`` (port 0: any); returns where it listens."""
        host, port = parse_address(address)
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        bound = server.server_address
        return str(bound[0]), int(bound[1])

    def close(self) -> None:
        """Stop the HTTP listener."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    async def timed(self, api: ApiContext, method: str, call: Awaitable[T]) -> T:
        """Await ``call`` (one dispatch), recording its outcome, latency and figures."""
        started = time.monotonic()
        outcome = "ok"
        try:
            result = await call
        except BaseException as exc:
            outcome = _outcome(exc)
            raise
        else:
            self._snapshot_figures(method, result)
            return result
        finally:
            self.requests.labels(method, outcome).inc()
            self.latency.labels(method).observe(time.monotonic() - started)
            self._refresh_vms(api)

    def _snapshot_figures(self, method: str, result: Any) -> None:
        op = _SNAPSHOT_OPS.get(method)
        if op is None or not isinstance(result, dict):
            return
        duration = result.get("duration_ms")
        if isinstance(duration, int | float):
            self.snapshot_duration.labels(op).observe(duration / _MS)
        written = result.get("bytes_written", result.get("bytes_restored"))
        if isinstance(written, int):
            self.snapshot_bytes.labels(op).inc(written)
        pause = result.get("pause_ms")
        if isinstance(pause, int | float):
            self.pause.observe(pause / _MS)

    def _refresh_vms(self, api: ApiContext) -> None:
        counts = dict.fromkeys(_VM_STATES, 0)
        if api.vm_count:
            runtime = api.runtime
            for vm_id in runtime.list():
                state = str(runtime.get(vm_id).state)
                counts[state] = counts.get(state, 0) + 1
        for state, n in counts.items():
            self.vms.labels(state).set(n)


def _outcome(exc: BaseException) -> str:
    """``cancelled``, the error's ``data.kind``, else its code, else ``error``."""
    rpc = getattr(exc, "rpc_error", exc)  # UnexpectedHandlerError carries the RpcError
    error = getattr(rpc, "error", None)  # RpcError.error is the wire ErrorObject
    kind = getattr(error, "kind", None)
    if isinstance(kind, str):
        return kind
    code = getattr(error, "code", None)
    if isinstance(code, int):
        return str(code)
    return "cancelled" if type(exc).__name__ == "Cancelled" else "error"
