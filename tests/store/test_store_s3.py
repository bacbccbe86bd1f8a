"""The S3 store against a real Ceph RGW: a killed push, gc, and dedup across Full pushes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import trio

from squibd.client import AsyncClient
from squibd.snapshot.manifest import MemoryRegion
from squibd.store.store import SnapshotStore
from tests.uffd._pairs import PAGE, vcpu_state, write_memory, write_state

from ._ceph import CephCluster
from .test_store_hosts import Host, _progress_beyond

MIB = 1024 * 1024
_KILLER = """
import json, os, signal, sys
from squibd.store.config import StoreConfig
from squibd.store.store import SnapshotStore
job = json.loads(sys.argv[1])
store = SnapshotStore("s", StoreConfig(**job["config"]))
def die(index):
    if index == job["at"]:
        os.kill(os.getpid(), signal.SIGKILL)
store.push(job["snap"], job["name"], chunk_hook=die)
"""


def _random_pair(directory: Path, name: str, mib: int) -> Path:
    regions = (MemoryRegion(0, mib * MIB, 0),)
    pages = {p: os.urandom(PAGE) for p in range(mib * MIB // PAGE)}
    manifest = write_memory(directory / f"{name}.mem", pages, regions=regions)
    write_state(directory / f"{name}.snap", manifest, (vcpu_state(rip=0x1000),))
    return directory / f"{name}.snap"


def test_killed_push_leaves_no_snapshot_and_gc_removes_its_chunks(
    s3_store_factory: Callable[[], SnapshotStore], tmp_path: Path
) -> None:
    store = s3_store_factory()
    store.push(str(_random_pair(tmp_path, "keep", 2)), "keep")
    kept = {i.key for i in store.objects.list("chunks/")}
    snap = _random_pair(tmp_path, "big", 16)
    job = {"config": attrs.asdict(store.config), "snap": str(snap), "name": "big", "at": 4}
    killed = subprocess.run([sys.executable, "-c", _KILLER, json.dumps(job)], check=False)
    assert killed.returncode == -9
    assert [s["name"] for s in store.list()] == ["keep"]  # nothing half-visible
    orphans = {i.key for i in store.objects.list("chunks/")} - kept
    assert len(orphans) >= 4
    result = store.gc(grace_s=0)  # the killed push's lease is void: its process is gone
    assert result.chunks_deleted == len(orphans) and result.bytes_freed >= 4 * 2 * MIB
    assert {i.key for i in store.objects.list("chunks/")} == kept
    out = tmp_path / "out"
    out.mkdir()
    store.pull("keep", str(out / "k.snap"), str(out / "k.mem"))
    assert (out / "k.mem").read_bytes() == (tmp_path / "keep.mem").read_bytes()


@pytest.mark.kvm
async def test_ten_full_pushes_of_a_mostly_static_guest_store_little_more_than_one(
    ceph: CephCluster, tmp_path: Path
) -> None:
    bucket = f"dedup-{os.getpid()}"
    host = Host(tmp_path / "a", ceph, bucket)
    piece = 512 * 1024
    try:
        with trio.fail_after(180):  # hang guard
            async with AsyncClient(host.socket) as c:
                await c.call("vm.create", {
                    "vm_id": "mw", "vcpu_count": 1, "mem_size_mib": 128,
                    "track_dirty_pages": True,
                    "guest": {"program": "memwriter", "working_set_mib": 1}})
                for i in range(96 * MIB // piece):  # static content, written once
                    await c.call("vm.write_memory", {
                        "vm_id": "mw", "guest_addr": 16 * MIB + i * piece,
                        "data_base64": base64.b64encode(os.urandom(piece)).decode()})
                await c.call("vm.start", {"vm_id": "mw"})
                progress = await _progress_beyond(c, "mw", [0])
                stored: list[int] = []
                for i in range(10):
                    snap = str(tmp_path / f"f{i}.snap")
                    await c.call("snapshot.create", {
                        "vm_id": "mw", "snapshot_type": "Full", "snapshot_path": snap,
                        "mem_file_path": snap[:-5] + ".mem"})
                    pushed = await c.call("store.push", {"snapshot_path": snap,
                                                         "store": "shared", "name": f"mw/{i}"})
                    stored.append(pushed["bytes_uploaded"])
                    progress = await _progress_beyond(c, "mw", progress)  # it keeps writing
                    os.unlink(snap)
                    os.unlink(snap[:-5] + ".mem")
        assert stored[0] >= 96 * MIB
        assert all(s > 0 for s in stored[1:])  # the working set did change each time
        assert sum(stored) <= 1.3 * stored[0], stored
    finally:
        host.stop()
