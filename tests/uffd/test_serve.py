"""The page server as a separate process serving an anonymous mapping (no KVM).

Faults come from ``ctypes.memmove`` reads, which release the GIL; the
backend's monitor thread therefore keeps running while a read is blocked.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from pathlib import Path

import pytest

from squibd.uffd import HandshakeFailed, PageServerUnavailable, UffdBackend
from squibd.vm.memory import GuestMemory

from ._pairs import MEM_SIZE, PAGE, REGIONS, page_pattern, vcpu_state, write_memory, write_state
from ._procs import page_server, read_stderr_until

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED = 4  # asm-generic/mman-common.h
#: How long a test waits for an event that should come at once (a failsafe, not a sync).
FAILSAFE_S = 30
WRITTEN = [0, 1, 2, 700, 1023, 1024, 1025, 2047]  # pages across both regions


def _host(memory: GuestMemory, page: int) -> int:
    offset = page * PAGE
    for region in memory.regions:
        if region.file_offset <= offset < region.file_offset + region.size:
            return region.host_addr + offset - region.file_offset
    raise AssertionError(page)


def _read(memory: GuestMemory, page: int, count: int = 1) -> bytes:
    buf = ctypes.create_string_buffer(count * PAGE)
    ctypes.memmove(buf, _host(memory, page), count * PAGE)  # releases the GIL while faulting
    return buf.raw


def _resident(memory: GuestMemory, page: int) -> bool:
    vec = ctypes.create_string_buffer(1)
    assert _libc.mincore(_host(memory, page), PAGE, vec) == 0
    return bool(vec.raw[0] & 1)


def _full_pair(tmp_path: Path, *, rip: int = 0, rsp: int = 0) -> Path:
    manifest = write_memory(tmp_path / "full.mem", {p: page_pattern(p) for p in WRITTEN})
    write_state(tmp_path / "full.snap", manifest, (vcpu_state(rip=rip, rsp=rsp),))
    return tmp_path / "full.snap"


def test_serves_every_page_of_a_full_snapshot_on_demand(tmp_path: Path) -> None:
    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc, GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        try:
            for page in WRITTEN:
                assert _read(memory, page) == page_pattern(page)
            assert _read(memory, 3) == bytes(PAGE)  # a hole reads as zeros
            assert _read(memory, 1026) == bytes(PAGE)
        finally:
            backend.close()
        assert proc.wait(FAILSAFE_S) == 0


def test_streams_all_memory_in_the_background(tmp_path: Path) -> None:
    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock) as proc, GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        try:
            read_stderr_until(proc, "background streaming done")
            assert all(_resident(memory, p) for p in range(0, MEM_SIZE // PAGE, 97))
            for region in memory.regions:
                first, count = region.file_offset // PAGE, region.size // PAGE
                assert _read(memory, first, count) == b"".join(
                    page_pattern(p) if p in WRITTEN else bytes(PAGE)
                    for p in range(first, first + count)
                )
        finally:
            backend.close()


def test_prefetches_rip_and_rsp_pages_before_ready(tmp_path: Path) -> None:
    # Paging off: RIP and RSP are guest-physical; page 1025 lies in the second region.
    rip = REGIONS[1].guest_addr + PAGE + 0x10
    snap = _full_pair(tmp_path, rip=rip, rsp=700 * PAGE + 0x40)
    sock = tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream"), GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        try:
            assert _resident(memory, 1025)
            assert _resident(memory, 700)
            assert not _resident(memory, 1)
        finally:
            backend.close()


def test_diff_chain_serves_the_newest_version_of_each_page(tmp_path: Path) -> None:
    full = write_memory(tmp_path / "a.mem", {p: page_pattern(p, 0) for p in WRITTEN})
    write_state(tmp_path / "a.snap", full, (vcpu_state(rip=0, rsp=0),))
    diff1 = write_memory(tmp_path / "b.mem", {1: page_pattern(1, 1), 1024: page_pattern(1024, 1),
                                               5: page_pattern(5, 1)}, parent=full.pair_id)
    write_state(tmp_path / "b.snap", diff1, (vcpu_state(rip=0, rsp=0),))
    diff2 = write_memory(tmp_path / "c.mem", {1024: page_pattern(1024, 2)}, parent=diff1.pair_id)
    write_state(tmp_path / "c.snap", diff2, (vcpu_state(rip=0, rsp=0),))
    sock = tmp_path / "ps.sock"
    args = ("--diff-snapshot", str(tmp_path / "b.snap"), str(tmp_path / "c.snap"))
    with page_server(tmp_path / "a.snap", sock, *args), GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        try:
            assert _read(memory, 0) == page_pattern(0, 0)
            assert _read(memory, 1) == page_pattern(1, 1)
            assert _read(memory, 5) == page_pattern(5, 1)
            assert _read(memory, 1024) == page_pattern(1024, 2)
            assert _read(memory, 2047) == page_pattern(2047, 0)
            assert _read(memory, 6) == bytes(PAGE)
        finally:
            backend.close()


def test_corrupt_chunk_is_never_served_and_the_error_names_the_offset(tmp_path: Path) -> None:
    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    corrupt_page = 1024  # first page of the second region: file offset 0x400000
    with open(tmp_path / "full.mem", "r+b") as mem:
        mem.seek(corrupt_page * PAGE + 100)
        mem.write(b"\xff")
    dead: list[str] = []
    died = threading.Event()
    with page_server(snap, sock, "--no-stream") as proc, GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        backend.start_monitor(lambda reason: (dead.append(reason), died.set()))
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(_read(memory, corrupt_page)),
                                  daemon=True)
        try:
            assert _read(memory, 0) == page_pattern(0)  # other chunks are fine
            reader.start()
            assert died.wait(FAILSAFE_S)
            assert "0x400000" in dead[0] and "corrupt" in dead[0]
            assert reader.is_alive() and got == []  # the reader never ran on that page
            assert proc.wait(FAILSAFE_S) == 1
            assert "0x400000" in (proc.stderr.read() if proc.stderr else "")
        finally:
            backend.close()  # releases the blocked reader (with zeros; the VM is gone)
            reader.join(FAILSAFE_S)
    assert got != [page_pattern(corrupt_page)]


def test_killed_page_server_is_reported_and_unserved_pages_stay_blocked(tmp_path: Path) -> None:
    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    dead: list[str] = []
    died = threading.Event()
    with page_server(snap, sock, "--no-stream") as proc, GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        backend.start_monitor(lambda reason: (dead.append(reason), died.set()))
        got: list[bytes] = []
        try:
            assert _read(memory, 2) == page_pattern(2)
            os.kill(proc.pid, signal.SIGKILL)
            assert died.wait(FAILSAFE_S)
            assert "closed the connection" in dead[0] and str(sock) in dead[0]
            assert backend.dead_reason == dead[0]
            reader = threading.Thread(target=lambda: got.append(_read(memory, 700)), daemon=True)
            reader.start()
            reader.join(0.2)  # bounded wait only; the assertion is that it is still blocked
            assert reader.is_alive() and got == []
        finally:
            backend.close()
        reader.join(FAILSAFE_S)
        assert dead == [dead[0]]  # reported once


def test_remove_event_turns_the_page_into_a_zero_page(tmp_path: Path) -> None:
    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream"), GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        try:
            assert _read(memory, 700) == page_pattern(700)
            assert _libc.madvise(_host(memory, 700), PAGE, MADV_DONTNEED) == 0
            assert _read(memory, 700) == bytes(PAGE)
            assert _read(memory, 701) == bytes(PAGE)
            assert _read(memory, 1) == page_pattern(1)
        finally:
            backend.close()


def test_absent_page_server_fails_the_connect(tmp_path: Path) -> None:
    with GuestMemory.anonymous(REGIONS) as memory, pytest.raises(PageServerUnavailable,
                                                                  match="no socket"):
        UffdBackend.connect(str(tmp_path / "nobody.sock"), memory)


def test_refusing_socket_fails_the_connect(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "refuse.sock"
    with socket.socket(socket.AF_UNIX) as bound, GuestMemory.anonymous(REGIONS) as memory:
        bound.bind(str(path))  # bound but not listening: connections are refused
        with pytest.raises(PageServerUnavailable, match="refused"):
            UffdBackend.connect(str(path), memory)


def test_server_closing_during_handshake_fails_the_connect(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "close.sock"
    with socket.socket(socket.AF_UNIX) as listener, GuestMemory.anonymous(REGIONS) as memory:
        listener.bind(str(path))
        listener.listen(1)

        def accept_and_close() -> None:
            conn, _ = listener.accept()
            conn.recv(1)
            conn.close()

        closer = threading.Thread(target=accept_and_close)
        closer.start()
        with pytest.raises(HandshakeFailed, match="closed the socket"):
            UffdBackend.connect(str(path), memory, ready_timeout=FAILSAFE_S)
        closer.join()


def test_layout_mismatch_is_refused_by_the_page_server(tmp_path: Path) -> None:
    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    other = (REGIONS[0],)
    with page_server(snap, sock) as proc, GuestMemory.anonymous(other) as memory:
        with pytest.raises(HandshakeFailed, match="memory layout"):
            UffdBackend.connect(str(sock), memory, ready_timeout=FAILSAFE_S)
        assert proc.wait(FAILSAFE_S) == 1


def test_page_server_of_another_snapshot_is_refused(tmp_path: Path) -> None:
    from squibd.snapshot.envelope import read_state_file

    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    pair_id = read_state_file(snap).memory.pair_id
    refused = pytest.raises(HandshakeFailed, match=f"pair {pair_id}, but the state file")
    with page_server(snap, sock, "--no-stream"), GuestMemory.anonymous(REGIONS) as memory, refused:
        UffdBackend.connect(str(sock), memory, expected_pair_id="another-pair",
                            ready_timeout=FAILSAFE_S)
    with page_server(snap, sock, "--no-stream"), GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory, expected_pair_id=pair_id)
        try:
            assert _read(memory, 1) == page_pattern(1)
        finally:
            backend.close()


def test_fault_granule_installs_the_whole_2mib_block_on_one_fault(tmp_path: Path) -> None:
    snap, sock = _full_pair(tmp_path), tmp_path / "ps.sock"
    granule = 2 * 1024 * 1024
    args = ("--no-stream", "--fault-granule", str(granule))
    with page_server(snap, sock, *args), GuestMemory.anonymous(REGIONS) as memory:
        backend = UffdBackend.connect(str(sock), memory)
        try:
            assert _read(memory, 2) == page_pattern(2)  # (page 0 was prefetched: RIP = 0)
            assert _resident(memory, granule // PAGE - 1)  # same block, never read
            assert not _resident(memory, granule // PAGE)  # next block
            assert _read(memory, 1) == page_pattern(1)
            assert _read(memory, 3) == bytes(PAGE)
            assert _read(memory, 700) == page_pattern(700)
        finally:
            backend.close()


@pytest.mark.parametrize(
    "argv",
    [
        ["--page-server", "--socket", "x.sock"],  # no --snapshot
        ["--page-server", "--snapshot", "a.snap"],  # no --socket
        ["--page-server", "--snapshot", "a.snap", "--socket", "s", "--diff-snapshot", "d.snap",
         "--diff-memory-file", "1.mem", "--diff-memory-file", "2.mem"],
    ],
)
def test_page_server_usage_errors_exit_2(argv: list[str]) -> None:
    from squibd.cli.daemon import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


def test_page_server_with_a_missing_snapshot_exits_1(tmp_path: Path) -> None:
    from squibd.cli.daemon import main

    argv = ["--page-server", "--snapshot", str(tmp_path / "none.snap"),
            "--socket", str(tmp_path / "s.sock")]
    assert main(argv) == 1
    assert not (tmp_path / "s.sock").exists()


def test_in_process_server_counts_faults_zero_pages_and_already_present(tmp_path: Path) -> None:
    import socket

    from squibd.snapshot.envelope import read_state_file
    from squibd.uffd import PageServer, PageSource, ServeStats

    snap = _full_pair(tmp_path)
    manifest = read_state_file(snap).memory
    source = PageSource.open([(str(tmp_path / "full.mem"), manifest)])
    server = PageServer(source, manifest.regions, prefetch=[PAGE], stream=False)
    results: list[ServeStats] = []
    path = tmp_path / "in.sock"
    with socket.socket(socket.AF_UNIX) as listener, GuestMemory.anonymous(REGIONS) as memory:
        listener.bind(str(path))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                results.append(server.serve(conn))

        thread = threading.Thread(target=serve)
        thread.start()
        backend = UffdBackend.connect(str(path), memory, ready_timeout=FAILSAFE_S)
        try:
            assert _read(memory, 1) == page_pattern(1)  # prefetched: no fault
            assert _read(memory, 2) == page_pattern(2)
            assert _read(memory, 3) == bytes(PAGE)
        finally:
            backend.close()
        thread.join(FAILSAFE_S)
    source.close()
    (stats,) = results
    assert (stats.prefetched_pages, stats.faults, stats.zero_pages) == (1, 2, 1)
    assert stats.error is None and not stats.streaming_done
