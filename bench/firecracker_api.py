"""Firecracker REST API overhead against JSON-RPC on the same daemon and VM (issue 14).

Figures (medians over ``SAMPLES`` round trips on one kept-alive connection each):
- ``fc_pause_resume_ms``: ``PATCH /vm {"state": "Paused"}`` then ``"Resumed"``
  on the VM's Firecracker API socket; baseline ``rpc_pause_resume_ms``:
  ``vm.pause`` then ``vm.resume`` over JSON-RPC. Both include the quiesce.
- ``fc_get_ms``: ``GET /`` (instance info); baseline ``rpc_describe_ms``:
  ``vm.describe``. Pure request handling: parsing, routing, one lookup.

The daemon runs in this process (trio), the clients in the same trio loop.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import _common
import trio

SAMPLES = 200
QUICK_SAMPLES = 40
WARMUP = 10
MEM_MIB = 32


class _Http:
    """A minimal keep-alive HTTP/1.1 client (h11) on a Unix socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        import h11

        self._h11 = h11
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, method: str, target: str, body: Any = None) -> int:
        h11 = self._h11
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [("Host", "localhost"), ("Content-Length", str(len(payload)))]
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if payload:
            data += self.conn.send(h11.Data(data=payload))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                return status


async def _run(samples: int) -> dict[str, Any]:
    from squibd.api import ApiContext
    from squibd.client import AsyncClient
    from squibd.config import DaemonConfig, ServerConfig, SnapshotConfig
    from squibd.server import Server, bind_unix_socket

    with tempfile.TemporaryDirectory(prefix="sqfc-", dir="/tmp") as directory:
        path = os.path.join(directory, "s.sock")
        api_sock = os.path.join(directory, "fc.sock")
        config = DaemonConfig(server=ServerConfig(socket=path), snapshot=SnapshotConfig())
        sock = bind_unix_socket(path, mode=0o600)
        server = Server(config, ApiContext(), [sock], [path], handle_signals=False)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                try:
                    async with AsyncClient(path) as rpc:
                        await rpc.call("vm.create", {
                            "vm_id": "b", "vcpu_count": 1, "mem_size_mib": MEM_MIB,
                            "guest": {"program": "counter"}, "api_socket": api_sock,
                        })  # fmt: skip
                        await rpc.call("vm.start", {"vm_id": "b"})
                        http = _Http(await trio.open_unix_socket(api_sock))

                        async def fc_cycle() -> None:
                            for state in ("Paused", "Resumed"):
                                status = await http.request("PATCH", "/vm", {"state": state})
                                if status != 204:
                                    raise RuntimeError(f"PATCH /vm answered {status}")

                        async def rpc_cycle() -> None:
                            await rpc.call("vm.pause", {"vm_id": "b"})
                            await rpc.call("vm.resume", {"vm_id": "b"})

                        async def fc_get() -> None:
                            if await http.request("GET", "/") != 200:
                                raise RuntimeError("GET / failed")

                        async def rpc_get() -> None:
                            await rpc.call("vm.describe", {"vm_id": "b"})

                        out: dict[str, Any] = {}
                        for name, fn in (("fc_pause_resume_ms", fc_cycle),
                                         ("rpc_pause_resume_ms", rpc_cycle),
                                         ("fc_get_ms", fc_get), ("rpc_describe_ms", rpc_get)):
                            stats = await _common.measure_async(fn, reps=samples, warmup=WARMUP)
                            out[name] = stats.scaled(1000).to_dict(p99=True)
                        await http.stream.aclose()
                        return out
                finally:
                    server.request_stop()
        finally:
            sock.close()
    raise AssertionError("unreachable")


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("firecracker_api", "needs /dev/kvm")
    samples = QUICK_SAMPLES if args.quick else SAMPLES
    figures = trio.run(_run, samples)
    figures["pause_resume_ratio"] = _common.ratio(
        figures["fc_pause_resume_ms"]["median"], figures["rpc_pause_resume_ms"]["median"]
    )
    figures["get_ratio"] = _common.ratio(
        figures["fc_get_ms"]["median"], figures["rpc_describe_ms"]["median"]
    )
    figures["machine"] = _common.machine_info()
    return figures


if __name__ == "__main__":
    _common.run_bench("firecracker_api", main, _common.parse_args(__doc__ or ""))
