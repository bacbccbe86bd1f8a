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


async def test_interleaved_alternates_who_goes_first_and_drops_warmup() -> None:
    import vs_qemu

    order: list[str] = []
    counter = {"q": 0, "s": 0}

    async def qemu() -> tuple[float, dict[str, object]]:
        counter["q"] += 1
        order.append("q")
        return float(counter["q"]), {"n": counter["q"]}

    async def squibd() -> tuple[float, object]:
        counter["s"] += 1
        order.append("s")
        return float(counter["s"]) / 2, counter["s"]

    pairs = await vs_qemu._interleaved(5, qemu, squibd)
    assert order == ["q", "s", "s", "q", "q", "s", "s", "q", "q", "s", "s", "q"]
    assert pairs.qemu == [2.0, 3.0, 4.0, 5.0, 6.0]  # the warm-up pair is dropped
    assert pairs.notes == [2, 3, 4, 5, 6]
    assert pairs.paired_ratio() == {"median": 0.5, "min": 0.5, "max": 0.5, "n": 5}


BENCH_VM_MIB = 16


@pytest.mark.kvm
async def test_bench_vm_saves_a_random_filled_guest_and_stays_paused(tmp_path: Path) -> None:
    try:
        import squibd.vm.runtime  # noqa: F401
    except ImportError as exc:  # the runtime part is still landing
        pytest.skip(f"squibd runtime not importable yet: {exc}")
    async with _squibd.bench_vm(BENCH_VM_MIB, str(tmp_path)) as vm:
        # All but the guest image's pages were filled with random bytes.
        assert vm.filled_bytes > BENCH_VM_MIB * _common.MIB // 2
        assert await vm.save_full() > 0
        result = await vm.save_live()
        assert result.live is True
        assert result.pause_ms > 0
        assert result.bytes_written >= vm.filled_bytes
        assert vm.rt.describe(_squibd.BENCH_VM_ID).state == "Paused"
    assert list(tmp_path.iterdir()) == []  # every save's files were removed
