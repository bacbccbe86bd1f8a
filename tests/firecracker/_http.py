"""A small HTTP/1.1 client over Unix sockets (h11 on trio) and an in-process slot server."""

from __future__ import annotations

import functools
import json
import os
from collections.abc import AsyncIterator, Collection
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import trio

from squibd.api import ApiContext
from squibd.api.firecracker import FirecrackerApp
from squibd.server import bind_api_socket, serve_http


@attrs.frozen
class Answer:
    """One HTTP answer: status, headers (lower-case names), decoded JSON body or None."""

    status: int
    headers: dict[str, str]
    body: Any


@attrs.define(eq=False)
class HttpClient:
    """One keep-alive connection to a Firecracker API socket."""

    stream: trio.SocketStream
    conn: h11.Connection = attrs.field(factory=lambda: h11.Connection(h11.CLIENT))

    @classmethod
    async def connect(cls, path: str) -> HttpClient:
        return cls(await trio.open_unix_socket(path))

    async def request(self, method: str, target: str, body: Any = None, *,
                      raw: bytes | None = None) -> Answer:  # fmt: skip
        payload = raw if raw is not None else b"" if body is None else json.dumps(body).encode()
        headers = [("Host", "localhost"), ("Accept", "application/json")]
        if payload or method in ("PUT", "PATCH"):
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        data = self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if payload:
            data += self.conn.send(h11.Data(data=payload))
        data += self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(data)
        response: h11.Response | None = None
        content = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
                continue
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                content += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected HTTP event {event!r}")
        assert response is not None
        headers_out = {k.decode().lower(): v.decode() for k, v in response.headers}
        return Answer(response.status_code, headers_out, json.loads(content) if content else None)

    async def aclose(self) -> None:
        await self.stream.aclose()


async def http(path: str, method: str, target: str, body: Any = None, *,
               raw: bytes | None = None) -> Answer:  # fmt: skip
    """One request on a fresh connection."""
    client = await HttpClient.connect(path)
    try:
        return await client.request(method, target, body, raw=raw)
    finally:
        await client.aclose()


@asynccontextmanager
async def serving_slot(
    path: str,
    *,
    vm_id: str = "slot",
    allowed_uids: Collection[int] | None = None,
    quiesce_timeout_s: float | None = None,
    memory_layout: str = "squibd",
    allowed_roots: tuple[str, ...] | None = None,
) -> AsyncIterator[FirecrackerApp]:
    """An empty VM slot serving Firecracker's API on ``path`` in this trio run."""
    api = ApiContext(quiesce_timeout_s=quiesce_timeout_s, allowed_roots=allowed_roots)
    app = FirecrackerApp(api, vm_id, memory_layout=memory_layout)
    uids = {os.getuid(), 0} if allowed_uids is None else allowed_uids
    sock = bind_api_socket(path)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(functools.partial(serve_http, sock, app, allowed_uids=uids))
            try:
                yield app
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await api.aclose()
        sock.close()
