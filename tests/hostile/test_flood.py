"""Issue 10, unbounded memory: a client that floods batches and never reads.

The daemon must stop reading that connection once its answers waiting to be
sent reach the budget, so its RSS stays bounded whatever the client sends;
other clients are served meanwhile. A real daemon subprocess; RSS from /proc.
"""

from __future__ import annotations

import json
import socket

from ._daemon import Daemon, rss_bytes

#: What the client tries to send (the daemon used to read and answer all of it).
FLOOD_BYTES = 32 * 1024 * 1024
#: How much the daemon's RSS may grow meanwhile (budget 1 MiB + buffers + slack).
RSS_GROWTH_BOUND = 48 * 1024 * 1024
#: A send blocked this long means the daemon has stopped reading: the flood ends
#: there (a stop condition for the loop, not an assertion).
STALL_S = 3.0


def _batch(calls: int) -> bytes:
    items = [{"jsonrpc": "2.0", "id": i, "method": "daemon.status"} for i in range(calls)]
    return json.dumps(items, separators=(",", ":")).encode() + b"\n"


def test_a_non_reading_batch_flooder_keeps_rss_bounded(sockdir: str) -> None:
    daemon = Daemon(sockdir, "--log-level", "warning")
    try:
        daemon.check_alive()
        baseline = rss_bytes(daemon.pid)
        line = _batch(200)
        sent = 0
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as flood:
            flood.connect(daemon.path)
            flood.settimeout(STALL_S)
            while sent < FLOOD_BYTES:
                try:
                    flood.sendall(line)
                except TimeoutError:
                    break  # the daemon stopped reading: backpressure
                except (BrokenPipeError, ConnectionResetError):
                    break  # the daemon dropped the non-reader: also bounded
                sent += len(line)
            growth = rss_bytes(daemon.pid) - baseline
            # Served meanwhile: the flooder's connection blocks nobody else.
            daemon.check_alive()
        assert growth < RSS_GROWTH_BOUND, (
            f"RSS grew by {growth >> 20} MiB after {sent >> 20} MiB of batches"
        )
        daemon.check_alive()
    finally:
        assert daemon.stop() == 0
