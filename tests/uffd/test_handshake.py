"""The handshake: Firecracker's wire shape, checked by a page server written here with
plain sockets and raw ioctls (no squibd code on the serving side)."""

from __future__ import annotations

import array
import contextlib
import ctypes
import fcntl
import json
import os
import select
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from squibd.uffd import HandshakeInvalid, RegionMapping, UffdBackend, decode_regions, encode_regions
from squibd.vm.memory import GuestMemory

from ._pairs import PAGE, REGIONS

# Raw values from linux/userfaultfd.h, written out here on purpose (independent of squibd).
RAW_UFFDIO_COPY = 0xC028AA03
RAW_EVENT_PAGEFAULT = 0x12
FAILSAFE_S = 30


class PlainPageServer:
    """Accepts one handshake and serves faults until the VMM closes the socket.

    Each page comes from ``memory_file`` when given, else is a fill byte (page index % 251).
    """

    def __init__(self, path: Path, memory_file: Path | None = None) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.memory_file = memory_file
        self.served = 0
        self.regions: list[dict[str, Any]] = []
        self.fd_count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4))
        fds = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload)
        self.fd_count = len(fds)
        self.regions = json.loads(data)
        uffd = fds[0]
        source = ctypes.create_string_buffer(PAGE)
        mem = os.open(self.memory_file, os.O_RDONLY) if self.memory_file else -1
        while True:
            readable, _, _ = select.select([uffd, conn], [], [])
            if conn in readable and not conn.recv(1):
                break  # the VMM closed the socket
            try:
                msg = os.read(uffd, 32)
            except BlockingIOError:
                continue
            event = msg[0]
            address = struct.unpack_from("<Q", msg, 16)[0]
            assert event == RAW_EVENT_PAGEFAULT
            page_address = address - address % PAGE
            region = next(r for r in self.regions
                          if r["base_host_virt_addr"] <= page_address
                          < r["base_host_virt_addr"] + r["size"])
            page = (region["offset"] + page_address - region["base_host_virt_addr"]) // PAGE
            if mem >= 0:
                ctypes.memmove(source, os.pread(mem, PAGE, page * PAGE), PAGE)
            else:
                ctypes.memset(source, page % 251, PAGE)
            arg = bytearray(struct.pack("<QQQQq", page_address, ctypes.addressof(source), PAGE,
                                        0, 0))
            with contextlib.suppress(FileExistsError):  # two vCPUs faulted the same page
                fcntl.ioctl(uffd, RAW_UFFDIO_COPY, arg)
            self.served += 1
        conn.close()
        os.close(uffd)
        if mem >= 0:
            os.close(mem)


def test_handshake_has_firecrackers_fields_and_serves_faults(tmp_path: Path) -> None:
    path = tmp_path / "plain.sock"
    server = PlainPageServer(path)
    with GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(path), memory, ready_timeout=0)
        try:
            buf = ctypes.create_string_buffer(PAGE)
            ctypes.memmove(buf, memory.regions[0].host_addr + 5 * PAGE, PAGE)
            assert buf.raw == bytes([5]) * PAGE
            ctypes.memmove(buf, memory.regions[1].host_addr, PAGE)
            first_of_second = REGIONS[1].file_offset // PAGE
            assert buf.raw == bytes([first_of_second % 251]) * PAGE
        finally:
            backend.close()
        server.thread.join(FAILSAFE_S)
        assert server.served == 2
    assert server.fd_count == 1
    assert [sorted(r) for r in server.regions] == [
        sorted(["base_host_virt_addr", "size", "offset", "page_size", "page_size_kib",
                "squibd_status"])  # the squibd extension: Firecracker-style servers ignore it
    ] * len(REGIONS)
    for sent, region, mapped in zip(server.regions, REGIONS, memory.regions, strict=True):
        assert sent["size"] == region.size
        assert sent["offset"] == region.file_offset
        assert sent["base_host_virt_addr"] == mapped.host_addr
        assert sent["page_size"] == PAGE
        assert sent["page_size_kib"] == PAGE  # bytes, as Firecracker sends it


_region = st.builds(
    RegionMapping,
    base_host_virt_addr=st.integers(0, 2**64 - 1),
    size=st.integers(0, 2**48),
    offset=st.integers(0, 2**48),
    page_size=st.sampled_from([4096, 2 * 1024 * 1024]),
)


@settings(max_examples=50, deadline=None)
@given(st.lists(_region, min_size=1, max_size=8))
def test_regions_round_trip(regions: list[RegionMapping]) -> None:
    assert decode_regions(encode_regions(regions)) == tuple(regions)


def test_older_page_size_kib_only_handshake_is_accepted() -> None:
    body = json.dumps([{"base_host_virt_addr": 4096, "size": 8192, "offset": 0,
                        "page_size_kib": 4096}]).encode()
    assert decode_regions(body) == (RegionMapping(4096, 8192, 0, 4096),)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b"not json", "not JSON"),
        (b"{}", "non-empty JSON array"),
        (b"[]", "non-empty JSON array"),
        (b'[{"base_host_virt_addr": 1, "size": 2, "offset": 0, "page_size": 3}]', "power of two"),
        (b'[{"base_host_virt_addr": -1, "size": 2, "offset": 0, "page_size": 4096}]',
         "non-negative"),
        (b'[{"size": 2, "offset": 0, "page_size": 4096}]', "base_host_virt_addr"),
    ],
)
def test_malformed_handshakes_are_rejected(body: bytes, match: str) -> None:
    with pytest.raises(HandshakeInvalid, match=match):
        decode_regions(body)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_decoding_arbitrary_bytes_never_crashes(body: bytes) -> None:
    with contextlib.suppress(HandshakeInvalid):
        decode_regions(body)


# Raw values from linux/userfaultfd.h and the x86_64 syscall table (independent of squibd).
RAW_NR_USERFAULTFD = 323
RAW_UFFDIO_API = 0xC018AA3F
RAW_UFFDIO_REGISTER = 0xC020AA00
RAW_UFFD_API = 0xAA
RAW_MODE_MISSING = 1


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="raw x86_64 syscall number")
@pytest.mark.parametrize(
    ("old_style", "close_early"),
    [(False, False), (True, False), (False, True)],
    ids=["page_size", "page_size_kib-only", "socket-closed-after-handshake"],
)
def test_squibd_page_server_serves_a_plain_vmm(
    tmp_path: Path, old_style: bool, close_early: bool
) -> None:
    """A VMM written here with raw syscalls (as Firecracker does it) gets its memory served,
    also when it closes its socket right after the handshake (Firecracker v1.7-v1.11)."""
    import mmap

    from ._pairs import page_pattern, vcpu_state, write_memory, write_state
    from ._procs import page_server

    manifest = write_memory(tmp_path / "f.mem", {1: page_pattern(1), 1024: page_pattern(1024)})
    write_state(tmp_path / "f.snap", manifest, (vcpu_state(rip=0, rsp=0),))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    with page_server(tmp_path / "f.snap", tmp_path / "ps.sock", "--no-stream") as proc:
        uffd = libc.syscall(RAW_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        assert uffd >= 0
        api = bytearray(struct.pack("<QQQ", RAW_UFFD_API, 0, 0))
        fcntl.ioctl(uffd, RAW_UFFDIO_API, api)
        maps = [mmap.mmap(-1, r.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                for r in REGIONS]
        anchors = [ctypes.c_char.from_buffer(m) for m in maps]
        bases = [ctypes.addressof(a) for a in anchors]
        body = []
        for base, region in zip(bases, REGIONS, strict=True):
            reg = bytearray(struct.pack("<QQQQ", base, region.size, RAW_MODE_MISSING, 0))
            fcntl.ioctl(uffd, RAW_UFFDIO_REGISTER, reg)
            entry = {"base_host_virt_addr": base, "size": region.size,
                     "offset": region.file_offset, "page_size_kib": PAGE}
            if not old_style:
                entry["page_size"] = PAGE
            body.append(entry)
        got: list[bytes] = []

        def read_pages() -> None:
            buf = ctypes.create_string_buffer(PAGE)
            for address in (bases[0] + PAGE, bases[1], bases[0] + 2 * PAGE):
                ctypes.memmove(buf, address, PAGE)  # GIL released while faulting
                got.append(buf.raw)

        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm:
            vmm.connect(str(tmp_path / "ps.sock"))
            vmm.sendmsg([json.dumps(body).encode()],
                       [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [uffd]))])
            if close_early:
                vmm.close()
            reader = threading.Thread(target=read_pages, daemon=True)
            reader.start()
            reader.join(FAILSAFE_S)  # a failsafe: the pages come at once when served
            assert not reader.is_alive(), "the page server stopped serving the VMM"
        assert got == [page_pattern(1), page_pattern(1024), bytes(PAGE)]
        # This VMM (the test process) is alive and did not ask for status lines: its
        # socket closing does not end the service; its process exiting would.
        assert proc.poll() is None
        proc.kill()
        del anchors
        for m in maps:
            m.close()
        os.close(uffd)


def test_the_status_request_is_read_from_the_handshake() -> None:
    from squibd.uffd.handshake import decode_handshake

    regions = [RegionMapping(4096, 8192, 0, 4096)]
    assert decode_handshake(encode_regions(regions, want_status=True)) == (tuple(regions), True)
    assert decode_handshake(encode_regions(regions)) == (tuple(regions), False)


def test_a_deeply_nested_handshake_is_invalid_not_a_crash() -> None:
    with pytest.raises(HandshakeInvalid):
        decode_regions(b"[" * 100_000 + b"]" * 100_000)
