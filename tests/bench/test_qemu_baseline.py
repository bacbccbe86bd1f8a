"""bench/_qemu.py against a real QEMU, and bench/_squibd.py's hole filling on a real memfd."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import _common
import _qemu
import _squibd
import numpy as np
import pytest

# QEMU's smallest comfortable pc machine; keeps the test well under a second of I/O.
QEMU_TEST_MIB = 16
PAGE = os.sysconf("SC_PAGE_SIZE")

needs_qemu = pytest.mark.skipif(shutil.which(_qemu.QEMU_BINARY) is None,
                                reason="qemu-system-x86_64 is not installed "
                                       "(bench/vs_qemu.py installs it)")


@pytest.fixture
def ram_file() -> object:
    path = f"/dev/shm/squibd-test-qemu-ram-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _common.fill_random_fd(fd, QEMU_TEST_MIB * _common.MIB, seed=5)
    finally:
        os.close(fd)
    yield path
    os.unlink(path)


@pytest.mark.kvm
@needs_qemu
def test_qemu_migrate_to_fd_saves_all_random_ram(ram_file: str, tmp_path: Path) -> None:
    binary = _qemu.ensure_qemu()
    qemu = _qemu.QemuProcess(binary=binary, mem_path=ram_file, mem_mib=QEMU_TEST_MIB,
                             qmp_path=str(tmp_path / "qmp.sock"))
    out = tmp_path / "state"
    with qemu:
        assert qemu.qmp is not None
        assert qemu.qmp.greeting["QMP"]["version"]["qemu"]["major"] >= 7
        assert qemu.qmp.execute("query-status")["status"] == "prelaunch"  # -S: paused
        _qemu.raise_bandwidth(qemu.qmp)
        params = qemu.qmp.execute("query-migrate-parameters")
        assert params["max-bandwidth"] == _qemu.UNLIMITED_BANDWIDTH
        info = _qemu.migrate_to_file(qemu.qmp, str(out))
        assert info["status"] == "completed"
        with pytest.raises(_qemu.QmpError, match="CommandNotFound"):
            qemu.qmp.execute("no-such-command")
    # Random pages cannot be sent as zero pages: the stream carries all of the RAM.
    assert out.stat().st_size > QEMU_TEST_MIB * _common.MIB
    assert not (tmp_path / "qmp.sock").exists()


@needs_qemu
def test_qemu_start_failure_reports_qemu_stderr(tmp_path: Path) -> None:
    qemu = _qemu.QemuProcess(binary=_qemu.ensure_qemu(), mem_path=str(tmp_path / "missing" / "x"),
                             mem_mib=QEMU_TEST_MIB, qmp_path=str(tmp_path / "qmp.sock"))
    with pytest.raises(_qemu.QmpError, match="QEMU"):
        qemu.start()
    assert qemu.proc is None


def test_fill_holes_random_keeps_data_pages_and_fills_the_rest() -> None:
    size = 8 * PAGE
    fd = os.memfd_create("bench-test")
    try:
        os.ftruncate(fd, size)
        marker = b"\xab" * PAGE
        os.pwrite(fd, marker, 3 * PAGE)
        import mmap

        with mmap.mmap(fd, size) as m:
            view = memoryview(m)
            try:
                filled = _squibd.fill_holes_random(fd, view, size, np.random.default_rng(1))
                assert filled == 7 * PAGE
                assert bytes(view[3 * PAGE:4 * PAGE]) == marker
                for page in (0, 1, 2, 4, 5, 6, 7):
                    assert bytes(view[page * PAGE:(page + 1) * PAGE]) != bytes(PAGE)
            finally:
                view.release()
    finally:
        os.close(fd)
