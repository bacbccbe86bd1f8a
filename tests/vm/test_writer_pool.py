"""The runtime's memory-writer pool: a save's helper threads are bounded and visible."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from squibd.snapshot.memwriter import WriteResult, write_memory
from squibd.vm.memory import MIB, GuestMemory
from squibd.vm.writer_pool import WriterPool


def _save(memory: GuestMemory, path: Path, pool: WriterPool | None) -> WriteResult:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return write_memory(fd, memory.regions, kind="Full", writers=4, threads=pool)
    finally:
        os.close(fd)


def _filled() -> GuestMemory:
    memory = GuestMemory.create(32)
    for n in range(8):  # 8 separate 2 MiB extents: several batches for several writers
        memory.write(n * 4 * MIB, os.urandom(2 * MIB))
    return memory


def test_writers_come_from_the_pool_and_never_exceed_it(tmp_path: Path) -> None:
    with _filled() as memory:
        reference = _save(memory, tmp_path / "ref.mem", None)
        pool = WriterPool(max_threads=2)
        result = _save(memory, tmp_path / "pool.mem", pool)
    assert result.digests == reference.digests and result.extents == reference.extents
    assert 1 <= pool.peak <= 2
    assert pool.active == 0
    assert (tmp_path / "pool.mem").read_bytes() == (tmp_path / "ref.mem").read_bytes()


def test_a_busy_pool_makes_the_writer_work_in_its_own_thread(tmp_path: Path) -> None:
    pool = WriterPool(max_threads=1)
    release = threading.Event()
    holders = pool.start(1, release.wait)  # another save holds the only thread
    try:
        assert pool.active == 1
        with _filled() as memory:
            reference = _save(memory, tmp_path / "ref.mem", None)
            result = _save(memory, tmp_path / "busy.mem", pool)
        assert result.digests == reference.digests
        assert pool.peak == 1  # the write took no thread beyond the bound
    finally:
        release.set()
        for holder in holders:
            holder.join()
    assert pool.active == 0
