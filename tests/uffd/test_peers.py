"""Peers that stall, queue, close early or die (issue 10, issue 14): every wait is bounded,
a page server serves several VMMs at once, and a VMM's end is noticed however it comes."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from squibd.uffd import HandshakeFailed, PageServerUnavailable, UffdBackend
from squibd.uffd.handshake import HELLO, receive_handshake
from squibd.vm.memory import GuestMemory

from ._pairs import PAGE, REGIONS, page_pattern, vcpu_state, write_memory, write_state
from ._procs import page_server, read_stderr_until, userfaultfds_of

FAILSAFE_S = 30
#: A short bound for waits that are meant to expire in these tests.
SHORT_S = 0.3
WRITTEN = [0, 1, 2, 700, 1023, 1024, 1025, 2047]
REGION_ARGS = [f"{r.file_offset}:{r.size}" for r in REGIONS]


def _pair(tmp_path: Path) -> Path:
    manifest = write_memory(tmp_path / "full.mem", {p: page_pattern(p) for p in WRITTEN})
    write_state(tmp_path / "full.snap", manifest, (vcpu_state(rip=0, rsp=0),))
    return tmp_path / "full.snap"


def _read(memory: GuestMemory, page: int) -> bytes:
    offset = page * PAGE
    for region in memory.regions:
        if region.file_offset <= offset < region.file_offset + region.size:
            buf = ctypes.create_string_buffer(PAGE)
            ctypes.memmove(buf, region.host_addr + offset - region.file_offset, PAGE)
            return buf.raw
    raise AssertionError(page)


def _listener(path: Path, backlog: int = 1) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(backlog)
    return sock


# --- the VMM side: every wait has a bound and a typed error ------------------------------
def test_a_server_that_never_takes_the_handshake_fails_the_connect_in_time(
    tmp_path: Path,
) -> None:
    # A page server serving one VMM at a time and busy with another: it never accepts.
    path = tmp_path / "busy.sock"
    refused = pytest.raises(HandshakeFailed, match="did not take the handshake within")
    with _listener(path), GuestMemory.anonymous(REGIONS) as memory, refused:
        UffdBackend.connect(str(path), memory, handshake_timeout=SHORT_S)


def test_a_full_connection_queue_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "full.sock"
    with _listener(path, backlog=0), socket.socket(socket.AF_UNIX) as queued:
        queued.connect(str(path))  # fills the queue of a listener that never accepts
        with GuestMemory.anonymous(REGIONS) as memory, pytest.raises(
            PageServerUnavailable, match="queue of connections is full"
        ):
            UffdBackend.connect(str(path), memory, handshake_timeout=FAILSAFE_S)


def test_fake_squibd_server_that_never_reports_ready_fails_the_connect_in_time(
    tmp_path: Path,
) -> None:
    # A fake: squibd's own server cannot be made to stall on demand after its hello.
    path = tmp_path / "stall.sock"
    taken = threading.Event()
    with _listener(path) as listener, GuestMemory.anonymous(REGIONS) as memory:

        def hello_then_stall() -> None:
            conn, _ = listener.accept()
            with conn:
                handshake = receive_handshake(conn, timeout=FAILSAFE_S)  # sends the hello
                os.close(handshake.uffd)
                taken.set()
                conn.recv(1)  # until the VMM gives up

        thread = threading.Thread(target=hello_then_stall)
        thread.start()
        with pytest.raises(HandshakeFailed, match="did not report ready within"):
            UffdBackend.connect(str(path), memory, ready_timeout=SHORT_S)
        thread.join(FAILSAFE_S)
    assert taken.is_set()


def test_a_firecracker_style_server_is_not_waited_for(tmp_path: Path) -> None:
    """It takes the handshake and never answers: connect returns at once, even with
    a ready timeout of an hour (it used to wait for a ready line it never sent)."""
    path = tmp_path / "fc.sock"
    release = threading.Event()
    with _listener(path) as listener, GuestMemory.anonymous(REGIONS) as memory:

        def take_and_stay_silent() -> None:
            conn, _ = listener.accept()
            with conn:
                _data, anc, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4))
                for _level, _kind, payload in anc:
                    os.close(int.from_bytes(payload[:4], sys.byteorder))
                release.wait(FAILSAFE_S)

        thread = threading.Thread(target=take_and_stay_silent)
        thread.start()
        connected: list[UffdBackend] = []
        connector = threading.Thread(target=lambda: connected.append(
            UffdBackend.connect(str(path), memory, ready_timeout=3600, handshake_timeout=3600)))
        connector.start()
        connector.join(FAILSAFE_S)
        try:
            assert not connector.is_alive() and len(connected) == 1
        finally:
            release.set()
            thread.join(FAILSAFE_S)
            for backend in connected:
                backend.close()


def test_the_hello_is_queued_before_the_handshake_is_consumed(tmp_path: Path) -> None:
    """What lets the VMM tell a squibd server from a silent one without a timeout."""
    import fcntl
    import struct
    import termios

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, GuestMemory.anonymous(REGIONS) as memory:
        from squibd.uffd.handshake import RegionMapping, send_handshake
        from squibd.uffd.userfaultfd import Userfaultfd

        regions = [RegionMapping(r.host_addr, r.size, r.file_offset, PAGE)
                   for r in memory.regions]
        with Userfaultfd.create() as uffd:
            send_handshake(a, regions, uffd.fd, want_status=True)
            handshake = receive_handshake(b, timeout=FAILSAFE_S)
            os.close(handshake.uffd)
        outq = struct.unpack("i", fcntl.ioctl(a.fileno(), termios.TIOCOUTQ, bytes(4)))[0]
        assert outq == 0 and handshake.wants_status
        assert a.recv(100, socket.MSG_DONTWAIT) == HELLO


# --- the server side: several VMMs, silent peers, VMMs that leave ---------------------------
def test_two_vmms_are_served_at_once(tmp_path: Path) -> None:
    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc, GuestMemory.anonymous(
        REGIONS
    ) as first, GuestMemory.anonymous(REGIONS) as second:
        one = UffdBackend.connect(str(sock), first, handshake_timeout=FAILSAFE_S)
        try:
            two = UffdBackend.connect(str(sock), second, handshake_timeout=FAILSAFE_S)
            try:
                assert _read(second, 700) == page_pattern(700)
                assert _read(first, 1025) == page_pattern(1025)
                assert _read(second, 1) == page_pattern(1)
                assert _read(first, 3) == bytes(PAGE)
            finally:
                two.close()
            assert _read(first, 700) == page_pattern(700)  # the first is still served
        finally:
            one.close()
        assert proc.wait(FAILSAFE_S) == 0  # the last VMM left: a one-shot server exits


def test_a_vmm_beyond_max_vms_is_refused_at_once_with_a_clear_message(tmp_path: Path) -> None:
    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream", "--max-vms", "1"), GuestMemory.anonymous(
        REGIONS
    ) as first, GuestMemory.anonymous(REGIONS) as second:
        one = UffdBackend.connect(str(sock), first)
        try:
            with pytest.raises(HandshakeFailed, match=r"serves 1 VMs already \(its --max-vms\)"):
                UffdBackend.connect(str(sock), second, handshake_timeout=FAILSAFE_S)
            assert _read(first, 2) == page_pattern(2)
        finally:
            one.close()


def test_a_silent_vmm_is_dropped_after_the_handshake_timeout_and_never_blocks_others(
    tmp_path: Path,
) -> None:
    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream", "--handshake-timeout", str(SHORT_S),
                     "--keep-serving") as proc, socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(sock))  # and never sends a handshake
        with GuestMemory.anonymous(REGIONS) as memory:
            backend = UffdBackend.connect(str(sock), memory, handshake_timeout=FAILSAFE_S)
            try:
                assert _read(memory, 1024) == page_pattern(1024)
            finally:
                backend.close()
        lines = read_stderr_until(proc, "no complete handshake within")
        assert "refusing the handshake" in lines[-1]
        assert silent.recv(4096).startswith(b'{"error": "no complete handshake')
        assert proc.poll() is None  # --keep-serving: it stays for the next VMM
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(FAILSAFE_S) == 1  # a refused handshake is reported in the status


class ChildVmm:
    """A Firecracker-like VMM in a child process (tests/uffd/_fc_vmm.py)."""

    def __init__(self, sock: Path, *, close_socket: bool) -> None:
        argv = [sys.executable, "-m", "tests.uffd._fc_vmm", str(sock), *REGION_ARGS]
        if close_socket:
            argv.append("--close-socket")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=Path(__file__).parents[2])
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == "ready\n"

    def read(self, page: int) -> bytes:
        """The page's first 8 bytes, as the child read them (through a fault)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"read {page}\n")
        self.proc.stdin.flush()
        return bytes.fromhex(self.proc.stdout.readline().strip())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def vmms() -> Iterator[list[ChildVmm]]:
    started: list[ChildVmm] = []
    yield started
    for vmm in started:
        vmm.stop()


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="raw x86_64 syscall number")
def test_killed_vmm_is_released_and_the_others_keep_being_served(
    tmp_path: Path, vmms: list[ChildVmm]
) -> None:
    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc:
        # Both close their socket right after the handshake, as Firecracker v1.7-v1.11 do.
        vmms.append(ChildVmm(sock, close_socket=True))
        vmms.append(ChildVmm(sock, close_socket=True))
        doomed, survivor = vmms
        assert doomed.read(700) == page_pattern(700)[:8]  # served after the socket closed
        assert survivor.read(1) == page_pattern(1)[:8]
        assert userfaultfds_of(proc.pid) == 2
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(FAILSAFE_S)
        lines = read_stderr_until(proc, f"done with VMM pid {doomed.proc.pid}")
        assert f"its process (pid {doomed.proc.pid}) exited" in lines[-1]
        assert userfaultfds_of(proc.pid) == 1  # the dead VMM's userfaultfd is released
        assert survivor.read(1024) == page_pattern(1024)[:8]
        assert survivor.read(5) == bytes(8)
        assert proc.poll() is None
        survivor.proc.send_signal(signal.SIGKILL)
        assert proc.wait(FAILSAFE_S) == 0  # it was the last one: the server exits


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="raw x86_64 syscall number")
def test_a_vmm_that_keeps_its_socket_and_dies_is_released_too(
    tmp_path: Path, vmms: list[ChildVmm]
) -> None:
    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc:
        vmms.append(ChildVmm(sock, close_socket=False))
        assert vmms[0].read(2047) == page_pattern(2047)[:8]
        vmms[0].proc.send_signal(signal.SIGKILL)
        assert proc.wait(FAILSAFE_S) == 0


def test_a_descriptor_that_is_not_a_userfaultfd_is_refused(tmp_path: Path) -> None:
    import array
    import json

    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    body = json.dumps([{"base_host_virt_addr": 1 << 30, "size": r.size, "offset": r.file_offset,
                        "page_size": PAGE, "squibd_status": 1} for r in REGIONS]).encode()
    with page_server(snap, sock) as proc, socket.socket(socket.AF_UNIX) as vmm, open(
        snap, "rb"
    ) as not_uffd:
        vmm.connect(str(sock))
        vmm.sendmsg([body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                              array.array("i", [not_uffd.fileno()]))])
        vmm.settimeout(FAILSAFE_S)
        replies = b""
        while b'"error"' not in replies:
            chunk = vmm.recv(4096)
            assert chunk, replies
            replies += chunk
        assert b"not a userfaultfd" in replies
        assert proc.wait(FAILSAFE_S) == 1


#: The page server in its own pid namespace: SO_PEERCRED cannot name a VMM outside it.
OWN_PID_NAMESPACE = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="raw x86_64 syscall number")
@pytest.mark.skipif(os.geteuid() != 0, reason="unshare --pid needs root")
def test_a_vmm_it_cannot_see_the_process_of_is_released_by_probing(
    tmp_path: Path, vmms: list[ChildVmm]
) -> None:
    """No pidfd can be had (the VMM is outside the server's pid namespace): once the VMM
    closed its socket, a served page is probed; ESRCH after its death ends the service."""
    from ._procs import page_server_argv

    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    argv = ("--snapshot", str(snap), "--socket", str(sock), "--no-stream")
    with page_server_argv(*argv, prefix=OWN_PID_NAMESPACE) as proc:
        vmms.append(ChildVmm(sock, close_socket=True))
        assert vmms[0].read(1023) == page_pattern(1023)[:8]
        assert "serving VMM pid unknown" in read_stderr_until(proc, "serving VMM pid")[-1]
        vmms[0].proc.send_signal(signal.SIGKILL)
        lines = read_stderr_until(proc, "done with VMM pid")
        assert "its address space is gone" in lines[-1]
        assert proc.wait(FAILSAFE_S) == 0


#: Descriptors one served VMM costs the page server: its socket, its userfaultfd, its pidfd.
FDS_PER_VMM = 3


def _limit_fds_to_one_more_vmm(pid: int) -> None:
    """Lower the server's RLIMIT_NOFILE so that exactly one more VMM's descriptors fit."""
    import resource

    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    limit, free = 0, 0
    while free < FDS_PER_VMM:
        if limit not in used:
            free += 1
        limit += 1
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, limit))


def test_out_of_descriptors_the_next_vmm_waits_for_one_to_leave(tmp_path: Path) -> None:
    snap, sock = _pair(tmp_path), tmp_path / "ps.sock"
    with page_server(snap, sock, "--no-stream") as proc, GuestMemory.anonymous(
        REGIONS
    ) as first, GuestMemory.anonymous(REGIONS) as second:
        _limit_fds_to_one_more_vmm(proc.pid)
        one = UffdBackend.connect(str(sock), first)
        connected: list[UffdBackend] = []
        waiting = threading.Thread(target=lambda: connected.append(
            UffdBackend.connect(str(sock), second, handshake_timeout=FAILSAFE_S)))
        try:
            waiting.start()
            read_stderr_until(proc, "waiting for one to leave")
            assert _read(first, 700) == page_pattern(700)  # still served meanwhile
            assert connected == []
            one.close()  # frees its descriptors: the queued VMM is taken
            waiting.join(FAILSAFE_S)
            assert len(connected) == 1
            assert _read(second, 1024) == page_pattern(1024)
        finally:
            one.close()
            waiting.join(FAILSAFE_S)
            for backend in connected:
                backend.close()
        assert proc.wait(FAILSAFE_S) == 0


def test_every_exported_uffd_error_names_its_kind() -> None:
    import squibd.uffd as uffd

    errors = [getattr(uffd, name) for name in uffd.__all__
              if isinstance(getattr(uffd, name), type)
              and issubclass(getattr(uffd, name), uffd.UffdError)]
    assert len(errors) >= 7
    assert all(error.kind == error.__name__ for error in errors)
