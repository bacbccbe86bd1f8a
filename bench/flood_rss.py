"""flood_rss: a client floods batches of daemon.status and never reads (issue 10).

Starts the real squibd (a subprocess on a temporary Unix socket, log level
warning), measures its RSS (VmRSS from /proc), then one client sends batches
of 200 ``daemon.status`` calls without ever reading an answer, until it has
sent the flood size or a send has been blocked for ``STALL_S`` (the daemon
stopped reading: its per-connection send budget is full) or the daemon has
dropped the client. Reported per repetition (a fresh daemon each): MiB sent
before the daemon pushed back, RSS growth in MiB, and whether it pushed back.

Usage: python bench/flood_rss.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Any, Final

import _common

FLOOD_MIB: Final = 64
QUICK_FLOOD_MIB: Final = 16
CALLS_PER_BATCH: Final = 200
STALL_S: Final = 3.0
_READY_TIMEOUT_S: Final = 30.0
_MIB: Final = 1 << 20


def _start_squibd(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    path = os.path.join(workdir, "squibd.sock")
    notify_path = os.path.join(workdir, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(_READY_TIMEOUT_S)
        proc = subprocess.Popen(
            [sys.executable, "-m", "squibd.cli.daemon", "--socket", path,
             "--log-level", "warning"],
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )  # fmt: skip
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    return proc, path


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _flood_once(flood_bytes: int) -> dict[str, Any]:
    items = [{"jsonrpc": "2.0", "id": i, "method": "daemon.status"}
             for i in range(CALLS_PER_BATCH)]  # fmt: skip
    line = json.dumps(items, separators=(",", ":")).encode() + b"\n"
    with _common.scratch_dir("squibd-flood-") as workdir:
        proc, path = _start_squibd(workdir)
        try:
            baseline = _rss(proc.pid)
            sent, outcome = 0, "sent everything"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as flood:
                flood.connect(path)
                flood.settimeout(STALL_S)
                while sent < flood_bytes:
                    try:
                        flood.sendall(line)
                    except TimeoutError:
                        outcome = "daemon stopped reading"
                        break
                    except (BrokenPipeError, ConnectionResetError):
                        outcome = "daemon dropped the client"
                        break
                    sent += len(line)
                growth = _rss(proc.pid) - baseline
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return {"sent_mib": sent / _MIB, "rss_growth_mib": growth / _MIB,
            "baseline_rss_mib": baseline / _MIB, "outcome": outcome}  # fmt: skip


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Flood a fresh daemon per repetition; return the figures."""
    flood_mib = QUICK_FLOOD_MIB if args.quick else FLOOD_MIB
    runs = []
    for rep in range(args.reps):
        _common.log(f"repetition {rep + 1}/{args.reps}: flooding up to {flood_mib} MiB")
        runs.append(_flood_once(flood_mib * _MIB))
    return {
        "flood_mib": flood_mib,
        "calls_per_batch": CALLS_PER_BATCH,
        "sent_mib": _common.summarize([r["sent_mib"] for r in runs]).to_dict(digits=2),
        "rss_growth_mib": _common.summarize([r["rss_growth_mib"] for r in runs]).to_dict(digits=2),
        "outcomes": sorted({r["outcome"] for r in runs}),
        "machine": _common.machine_info(),
    }


if __name__ == "__main__":
    _common.run_bench("flood_rss", main, _common.parse_args(__doc__ or ""))
