"""The VMM protocol codec (sans-IO) and its fd transport, without KVM."""

from __future__ import annotations

import os
import socket
import struct

import msgpack
import pytest

from squibd.config import ConfigError, parse_config
from squibd.vmm.channel import Channel, ChannelClosed
from squibd.vmm.host import describe_status
from squibd.vmm.protocol import (
    MAX_FRAME,
    VERSION,
    FrameDecoder,
    ProtocolError,
    encode,
    error_reply,
    ok_reply,
    request,
)


def test_frames_survive_any_split() -> None:
    messages = [
        request(1, "pause"),
        ok_reply(1, {"words": [b"\x01" * 16]}),
        error_reply(2, "NotLogging", "off"),
        {"event": "vcpu_error", "index": 0},
    ]
    stream = b"".join(encode(m) for m in messages)
    for step in (1, 3, 7, len(stream)):
        decoder = FrameDecoder()
        out = []
        for start in range(0, len(stream), step):
            decoder.feed(stream[start : start + step])
            while (message := decoder.next()) is not None:
                out.append(message)
        assert out == [{"v": VERSION, **m} for m in messages]
        assert decoder.pending == 0


def test_other_version_oversize_and_garbage_are_refused() -> None:
    decoder = FrameDecoder()
    body = msgpack.packb({"v": VERSION + 1, "id": 1, "op": "pause"})
    decoder.feed(struct.pack("<I", len(body)) + body)
    with pytest.raises(ProtocolError, match="version"):
        decoder.next()
    decoder = FrameDecoder()
    decoder.feed(struct.pack("<I", MAX_FRAME + 1))
    with pytest.raises(ProtocolError, match="exceeds"):
        decoder.next()
    decoder = FrameDecoder()
    decoder.feed(struct.pack("<I", 3) + msgpack.packb([1, 2]))
    with pytest.raises(ProtocolError, match="not a map"):
        decoder.next()


def test_channel_passes_fds_with_their_message() -> None:
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    r, w = os.pipe()
    try:
        left.send(request(1, "attach"))
        left.send(ok_reply(1), [w])
        first, fds1 = right.receive()
        second, fds2 = right.receive()
        assert first["op"] == "attach" and fds1 == []
        assert second["fds"] == 1 and len(fds2) == 1
        os.write(fds2[0], b"x")
        assert os.read(r, 1) == b"x"
        os.close(fds2[0])
        left.close()
        with pytest.raises(ChannelClosed):
            right.receive()
    finally:
        right.close()
        os.close(r)
        os.close(w)


def test_wait_status_in_words() -> None:
    assert describe_status(9) == "killed by SIGKILL"
    assert describe_status(3 << 8) == "exited with status 3"


def test_vm_isolation_config_is_checked() -> None:
    config = parse_config({"server": {"vm_isolation": "process", "stop_vms_on_exit": True}})
    assert config.server.vm_isolation == "process" and config.server.stop_vms_on_exit
    assert parse_config({}).server.vm_isolation == "process"
    with pytest.raises(ConfigError, match="vm_isolation"):
        parse_config({"server": {"vm_isolation": "container"}})


@pytest.mark.parametrize(("on_shutdown", "stop_vms_on_exit", "stops"), [
    ("keep", False, False), ("keep", True, True), ("stop", False, True), ("save", False, True),
])  # fmt: skip
def test_only_on_shutdown_keep_leaves_vm_processes_to_the_next_daemon(
    on_shutdown: str, stop_vms_on_exit: bool, stops: bool
) -> None:
    from squibd.vmm.statedir import vm_process_settings

    config = parse_config({"server": {"vm_isolation": "process", "on_shutdown": on_shutdown,
                                      "stop_vms_on_exit": stop_vms_on_exit}})  # fmt: skip
    assert vm_process_settings(config.server)["stop_vms_on_exit"] is stops


def test_dirty_words_round_trip_sparse_and_dense_through_a_frame() -> None:
    import numpy as np

    from squibd.vmm.protocol import pack_dirty_words, unpack_dirty_words

    sparse = np.zeros(4096, dtype=np.uint64)
    sparse[[0, 17, 4095]] = [1, 2**63, 0xF0F0]
    dense = np.arange(1, 65, dtype=np.uint64)
    for words in (sparse, dense, np.zeros(10, dtype=np.uint64), np.zeros(0, dtype=np.uint64)):
        item = pack_dirty_words(words)
        decoder = FrameDecoder()
        decoder.feed(encode(ok_reply(1, {"dirty": [item]})))
        message = decoder.next()
        assert message is not None
        back = unpack_dirty_words(message["result"]["dirty"][0])
        assert back.dtype == np.uint64 and np.array_equal(back, words)
    assert pack_dirty_words(sparse)[1] is not None  # sparse form: 3 words sent, not 4096
    assert pack_dirty_words(dense)[1] is None


@pytest.mark.parametrize(
    "item",
    [
        [4, b"\x05\x00\x00\x00", b"\x01" + b"\x00" * 7],  # index beyond the bitmap
        [4, b"\x01\x00\x00\x00", b""],  # an index without a value
        [3, None, b"\x00" * 16],  # dense, wrong length
        [4, None],  # not a triple
        "words",
    ],
)
def test_malformed_dirty_words_are_a_protocol_error(item: object) -> None:
    from squibd.vmm.protocol import unpack_dirty_words

    with pytest.raises(ProtocolError, match="malformed dirty words"):
        unpack_dirty_words(item)


async def test_a_peer_breaking_the_protocol_ends_its_connection_not_the_trio_run() -> None:
    """The trio reader of a VM socket: a malformed reply (a peer is less
    trusted than the daemon) fails the waiting request and ends only that
    connection, reported through ``on_closed`` from a worker thread."""
    import threading

    import trio

    from squibd.vmm.host import Connection, RequestFailed

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    closed: list[tuple[str, bool]] = []
    ended = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def on_closed(reason: str) -> None:
        closed.append((reason, threading.current_thread() is threading.main_thread()))
        token.run_sync_soon(ended.set)

    conn = Connection(Channel(ours), on_event=lambda _m: None, on_closed=on_closed)
    conn.start(token)
    peer = Channel(theirs)
    try:
        waiting = conn.begin("describe", on_trio=True)
        request_msg, _ = await trio.to_thread.run_sync(peer.receive)
        assert request_msg["op"] == "describe"
        peer.send({"id": "not a number", "ok": True, "result": {}})
        with pytest.raises(RequestFailed) as failed:
            await waiting.await_result()
        assert failed.value.kind == "ProcessGone" and "protocol error" in failed.value.message
        with trio.fail_after(30):
            await ended.wait()
        assert closed == [(closed[0][0], False)] and "not an integer" in closed[0][0]
        assert conn.closed
        assert await trio.to_thread.run_sync(lambda: conn.join(30))
    finally:
        peer.close()
