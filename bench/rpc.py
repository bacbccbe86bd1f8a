"""rpc_rps / rpc_p99_ms: ``daemon.status`` with 50 concurrent clients (BENCH.md).

Runs the real squibd (a subprocess on a temporary Unix socket) and, as the
baseline, a bare trio line-echo server over the same socket type (also a
subprocess) that answers each line with a fixed JSON response: what any
Python/trio JSON-RPC server costs before doing any work. The same trio load
generator (50 persistent connections, one request in flight each) drives
both. Reported: requests/s (median, min, max over the repetitions), p99
latency per repetition (median, min, max), and squibd/baseline ratios.

All 50 connections are opened and served once before the clock starts, so the
figures are the steady state (not the accept burst).

Usage: python bench/rpc.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Final

import _common
import trio

CLIENTS: Final = 50  # BENCH.md: "daemon.status with 50 concurrent clients"
REQUESTS_PER_CLIENT: Final = 100
QUICK_REQUESTS_PER_CLIENT: Final = 20
REQUEST: Final = b'{"jsonrpc":"2.0","id":1,"method":"daemon.status"}\n'
_READY_TIMEOUT_S: Final = 30.0

BASELINE_SERVER: Final = r"""
import os, socket, sys, trio
ANSWER = b'{"jsonrpc":"2.0","id":1,"result":{"version":"0","pid":%d}}\n' % os.getpid()
async def handle(stream):
    buf = b""
    async with stream:
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                _, buf = buf.split(b"\n", 1)
                await stream.send_all(ANSWER)
async def main(path):
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    sock.listen(512)
    print("ready", flush=True)
    await trio.serve_listeners(handle, [trio.SocketListener(sock)])
trio.run(main, sys.argv[1])
"""


async def _roundtrip(stream: trio.SocketStream, buf: bytes) -> bytes:
    await stream.send_all(REQUEST)
    while b"\n" not in buf:
        buf += await stream.receive_some(65536)
    return buf.split(b"\n", 1)[1]


class _Barrier:
    """Clients check in after their warm-up request; timing starts when all have."""

    def __init__(self, parties: int) -> None:
        self.waiting = parties
        self.all_ready = trio.Event()
        self.go = trio.Event()

    def check_in(self) -> None:
        self.waiting -= 1
        if self.waiting == 0:
            self.all_ready.set()


async def _client(path: str, count: int, latencies: list[float], barrier: _Barrier) -> None:
    stream = await trio.open_unix_socket(path)
    async with stream:
        # Warm-up: the connection is accepted and served once before anything is timed.
        buf = await _roundtrip(stream, b"")
        barrier.check_in()
        await barrier.go.wait()
        for _ in range(count):
            started = time.perf_counter()
            buf = await _roundtrip(stream, buf)
            latencies.append(time.perf_counter() - started)


async def _load(path: str, per_client: int) -> tuple[float, float]:
    """One repetition: (requests per second, p99 latency in ms), in steady state."""
    latencies: list[float] = []
    barrier = _Barrier(CLIENTS)
    async with trio.open_nursery() as nursery:
        for _ in range(CLIENTS):
            nursery.start_soon(_client, path, per_client, latencies, barrier)
        await barrier.all_ready.wait()
        started = time.perf_counter()
        barrier.go.set()
    elapsed = time.perf_counter() - started
    return len(latencies) / elapsed, _common.percentile(latencies, _common.P99) * 1000


def _start_squibd(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(workdir, "squibd.sock")
    notify_path = os.path.join(workdir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(_READY_TIMEOUT_S)
        proc = subprocess.Popen(
            [sys.executable, "-m", "squibd.cli.daemon", "--socket", path, "--log-level", "error"],
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    return proc, path


def _start_baseline(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(workdir, "echo.sock")
    proc = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, path], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    proc.stdout.readline()  # "ready"
    return proc, path


def _measure(path: str, per_client: int, reps: int) -> tuple[_common.Stats, _common.Stats]:
    trio.run(_load, path, per_client)  # warm-up
    rps, p99 = [], []
    for _ in range(reps):
        r, p = trio.run(_load, path, per_client)
        rps.append(r)
        p99.append(p)
    return _common.summarize(rps), _common.summarize(p99)


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Measure squibd and the baseline; return the figures."""
    per_client = QUICK_REQUESTS_PER_CLIENT if args.quick else REQUESTS_PER_CLIENT
    with _common.scratch_dir("squibd-rpc-") as workdir:
        procs = []
        try:
            squibd, squibd_path = _start_squibd(workdir)
            procs.append(squibd)
            baseline, baseline_path = _start_baseline(workdir)
            procs.append(baseline)
            _common.log(f"squibd: {CLIENTS} clients x {per_client} daemon.status")
            rps, p99 = _measure(squibd_path, per_client, args.reps)
            _common.log("baseline: bare trio line server")
            base_rps, base_p99 = _measure(baseline_path, per_client, args.reps)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=30)
    return {
        "clients": CLIENTS,
        "requests_per_client": per_client,
        "rpc_rps": rps.to_dict(digits=1),
        "rpc_p99_ms": p99.to_dict(digits=3),
        "baseline_rps": base_rps.to_dict(digits=1),
        "baseline_p99_ms": base_p99.to_dict(digits=3),
        "rps_ratio": _common.ratio(rps.median, base_rps.median),
        "p99_ratio": _common.ratio(p99.median, base_p99.median),
        "machine": _common.machine_info(),
    }


if __name__ == "__main__":
    _common.run_bench("rpc", main, _common.parse_args(__doc__ or ""))
