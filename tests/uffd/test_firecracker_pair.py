"""``squibd --page-server --firecracker-snapshot F.snap --memory-file F.mem``: a pair
Firecracker made (its bincode-era state file, a raw memory file, no squibd manifest)."""

from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import pytest

from squibd.snapshot.envelope import MAGIC_X86_64, crc64
from squibd.uffd import HandshakeFailed, UffdBackend
from squibd.vm.memory import GuestMemory

from ._pairs import MEM_SIZE, PAGE, REGIONS, page_pattern, vcpu_state, write_memory, write_state
from ._procs import page_server_argv, read_stderr_until

FAILSAFE_S = 30
DATA_PAGES = [0, 3, 1024, 2047]
NO_DIGESTS = "no page is digest-checked"


def _firecracker_pair(tmp_path: Path) -> tuple[Path, Path]:
    """A state file with Firecracker's header (magic, version length, version) and a
    bincode body (VmInfo starts with mem_size_mib as a u64), and a sparse raw memory file."""
    version = b"4.0.0"
    body = struct.pack("<QB", MEM_SIZE >> 20, 0) + bytes(range(40))
    data = struct.pack("<QQ", MAGIC_X86_64, len(version)) + version + body
    snap = tmp_path / "fc.snap"
    snap.write_bytes(data + struct.pack("<Q", crc64(data)))
    mem = tmp_path / "fc.mem"
    with open(mem, "wb") as out:
        out.truncate(MEM_SIZE)
        for page in DATA_PAGES:
            out.seek(page * PAGE)
            out.write(page_pattern(page, 9))
    return snap, mem


def _read(memory: GuestMemory, page: int) -> bytes:
    offset = page * PAGE
    for region in memory.regions:
        if region.file_offset <= offset < region.file_offset + region.size:
            buf = ctypes.create_string_buffer(PAGE)
            ctypes.memmove(buf, region.host_addr + offset - region.file_offset, PAGE)
            return buf.raw
    raise AssertionError(page)


def test_serves_a_firecracker_pair_without_digests_and_says_so_once(tmp_path: Path) -> None:
    snap, mem = _firecracker_pair(tmp_path)
    sock = tmp_path / "ps.sock"
    argv = ("--firecracker-snapshot", str(snap), "--memory-file", str(mem), "--socket", str(sock),
            "--no-stream")
    with page_server_argv(*argv) as proc, GuestMemory.anonymous(
        REGIONS
    ) as first, GuestMemory.anonymous(REGIONS) as second:
        one = UffdBackend.connect(str(sock), first, expected_pair_id="any: none is announced")
        two = UffdBackend.connect(str(sock), second)
        try:
            for page in DATA_PAGES:
                assert _read(first, page) == page_pattern(page, 9)
            assert _read(first, 1) == bytes(PAGE)  # a hole of the sparse file
            assert _read(second, 1024) == page_pattern(1024, 9)
        finally:
            one.close()
            two.close()
        assert proc.wait(FAILSAFE_S) == 0
        assert proc.stderr is not None
        log = proc.stderr.read()
    assert log.count(NO_DIGESTS) == 1
    assert "4.0.0" in log


def test_a_vm_larger_than_the_memory_file_is_refused(tmp_path: Path) -> None:
    snap, mem = _firecracker_pair(tmp_path)
    os.truncate(mem, REGIONS[0].size)  # only the first region's worth
    sock = tmp_path / "ps.sock"
    argv = ("--firecracker-snapshot", str(snap), "--memory-file", str(mem), "--socket", str(sock))
    with page_server_argv(*argv) as proc, GuestMemory.anonymous(REGIONS) as memory:
        with pytest.raises(HandshakeFailed, match="larger than the memory file"):
            UffdBackend.connect(str(sock), memory)
        read_stderr_until(proc, "refusing the handshake")
        assert proc.wait(FAILSAFE_S) == 1


def test_a_squibd_snapshot_given_as_a_firecracker_one_is_refused(tmp_path: Path) -> None:
    from squibd.cli.daemon import main

    manifest = write_memory(tmp_path / "s.mem", {1: page_pattern(1)})
    write_state(tmp_path / "s.snap", manifest, (vcpu_state(rip=0, rsp=0),))
    argv = ["--page-server", "--firecracker-snapshot", str(tmp_path / "s.snap"),
            "--memory-file", str(tmp_path / "s.mem"), "--socket", str(tmp_path / "x.sock")]
    assert main(argv) == 1
    assert not (tmp_path / "x.sock").exists()


def test_a_damaged_firecracker_state_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from squibd.cli.daemon import main

    snap, mem = _firecracker_pair(tmp_path)
    data = bytearray(snap.read_bytes())
    data[30] ^= 0xFF
    snap.write_bytes(bytes(data))
    argv = ["--page-server", "--firecracker-snapshot", str(snap), "--memory-file", str(mem),
            "--socket", str(tmp_path / "x.sock")]
    assert main(argv) == 1
    assert "CRC" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--firecracker-snapshot", "f.snap", "--socket", "s"],  # no --memory-file
        ["--firecracker-snapshot", "f.snap", "--snapshot", "g.snap", "--socket", "s"],
        ["--firecracker-snapshot", "f.snap", "--memory-file", "m", "--socket", "s",
         "--diff-snapshot", "d.snap"],
    ],
)
def test_firecracker_usage_errors_exit_2(argv: list[str]) -> None:
    from squibd.cli.daemon import main

    with pytest.raises(SystemExit) as exited:
        main(["--page-server", *argv])
    assert exited.value.code == 2
