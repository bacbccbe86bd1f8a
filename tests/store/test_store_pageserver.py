"""``squibd --page-server --store``: a real page-server process fed by a store."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

from squibd.store.config import StoreConfig
from squibd.store.store import SnapshotStore
from squibd.uffd import UffdBackend
from squibd.vm.memory import GuestMemory
from tests.uffd._pairs import MEM_SIZE, PAGE, REGIONS, page_pattern, vcpu_state, write_state
from tests.uffd._pairs import write_memory as write_pair_memory

WRITTEN = [0, 1, 2, 700, 1023, 1024, 1025, 2047]


def _read(memory: GuestMemory, page: int) -> bytes:
    offset = page * PAGE
    for region in memory.regions:
        if region.file_offset <= offset < region.file_offset + region.size:
            buf = ctypes.create_string_buffer(PAGE)
            ctypes.memmove(buf, region.host_addr + offset - region.file_offset, PAGE)
            return buf.raw
    raise AssertionError(page)


def _setup(tmp_path: Path) -> tuple[Path, str]:
    store_dir = tmp_path / "store"
    config = tmp_path / "squibd.toml"
    config.write_text(f'[stores.local]\nurl = "file://{store_dir}"\n'
                      f'cache_dir = "{tmp_path / "cache"}"\n')
    manifest = write_pair_memory(tmp_path / "f.mem", {p: page_pattern(p) for p in WRITTEN})
    write_state(tmp_path / "f.snap", manifest, (vcpu_state(rip=0x1000),))
    store = SnapshotStore("local", StoreConfig(url=f"file://{store_dir}",
                                               cache_dir=str(tmp_path / "push-cache")))
    store.push(str(tmp_path / "f.snap"), "vm/one")
    return config, manifest.pair_id


def _start(config: Path, sock: Path, name: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "squibd.cli.daemon", "--page-server", "--store", "local",
         "--name", name, "--config", str(config), "--socket", str(sock)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_page_server_serves_a_stored_snapshot(tmp_path: Path) -> None:
    config, pair = _setup(tmp_path)
    sock = tmp_path / "ps.sock"
    proc = _start(config, sock, "vm/one")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == f"listening {sock}"
        with GuestMemory.anonymous(REGIONS) as memory:
            backend = UffdBackend.connect(str(sock), memory, expected_pair_id=pair)
            try:
                for page in range(0, MEM_SIZE // PAGE, 7):
                    want = page_pattern(page) if page in WRITTEN else bytes(PAGE)
                    assert _read(memory, page) == want
                for page in WRITTEN:
                    assert _read(memory, page) == page_pattern(page)
            finally:
                backend.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_page_server_refuses_unknown_snapshot_and_bad_usage(tmp_path: Path) -> None:
    config, _ = _setup(tmp_path)
    proc = _start(config, tmp_path / "ps.sock", "vm/none")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "holds no snapshot named 'vm/none'" in out
    usage = subprocess.run(
        [sys.executable, "-m", "squibd.cli.daemon", "--page-server", "--store", "local",
         "--socket", str(tmp_path / "s")], capture_output=True, text=True, check=False)
    assert usage.returncode == 2
