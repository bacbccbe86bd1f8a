"""Two daemons sharing nothing but a real Ceph S3 store: push on one, restore on the other.

Each daemon is a real ``squibd`` process with its own socket, configuration and
chunk cache (its own "host"); they see the same bucket. Guests are real KVM VMs.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from squibd.client import AsyncClient, SquibdError
from squibd.store.chunks import chunk_key
from squibd.store.store import SnapshotStore
from tests.server.helpers import start_daemon

from ._ceph import CephCluster
from .conftest import s3_config

pytestmark = pytest.mark.kvm

MIB = 1024 * 1024
FILL_BASE = 32 * MIB
FILL_MIB = 8
#: Under the daemon's 1 MiB line limit once base64-encoded.
PIECE = 512 * 1024


def _config(path: Path, ceph: CephCluster, bucket: str, cache: Path) -> str:
    path.write_text(
        "[stores.shared]\n"
        f'url = "s3://{bucket}/fleet"\n'
        f'endpoint = "{ceph.endpoint}"\n'
        'region = "us-east-1"\n'
        f'access_key_id = "{ceph.access_key}"\n'
        f'secret_access_key = "{ceph.secret_key}"\n'
        "create_bucket = true\n"
        f'cache_dir = "{cache}"\n'
    )
    return str(path)


class Host:
    def __init__(self, directory: Path, ceph: CephCluster, bucket: str) -> None:
        directory.mkdir()
        self.dir = directory
        config = _config(directory / "squibd.toml", ceph, bucket, directory / "cache")
        self.proc, self.socket = start_daemon(str(directory), "--config", config, "--debug-api")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def hosts(ceph: CephCluster, tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    bucket = f"hosts-{os.getpid()}-{tmp_path.name[-12:].lower().replace('_', '-')}"
    a = Host(tmp_path / "a", ceph, bucket)
    try:
        b = Host(tmp_path / "b", ceph, bucket)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


async def _progress_beyond(c: AsyncClient, vm_id: str, floor: list[int]) -> list[int]:
    with trio.fail_after(60):  # a hang guard, not a timing assertion
        while True:
            progress: list[int] = (await c.call("vm.describe", {"vm_id": vm_id}))[
                "guest_progress"]
            if all(p > f for p, f in zip(progress, floor, strict=True)):
                return progress


async def _read_all(c: AsyncClient, vm_id: str, size: int) -> bytes:
    out = bytearray()
    for addr in range(0, size, PIECE):
        r = await c.call("vm.read_memory", {"vm_id": vm_id, "guest_addr": addr,
                                            "length": PIECE})
        out += base64.b64decode(r["data_base64"])
    return bytes(out)


async def _saved_vm(c: AsyncClient, directory: Path, vm_id: str = "src") -> tuple[str, list[int]]:
    """A running counter VM with random filler, paused and saved as a Full pair."""
    await c.call("vm.create", {"vm_id": vm_id, "vcpu_count": 2, "mem_size_mib": 64,
                               "track_dirty_pages": True, "guest": {"program": "counter"}})
    for i in range(FILL_MIB * 2):
        data = base64.b64encode(os.urandom(PIECE)).decode()
        await c.call("vm.write_memory", {"vm_id": vm_id, "guest_addr": FILL_BASE + i * PIECE,
                                         "data_base64": data})
    await c.call("vm.start", {"vm_id": vm_id})
    await _progress_beyond(c, vm_id, [0, 0])
    saved = (await c.call("vm.pause", {"vm_id": vm_id}))["guest_progress"]
    snap = str(directory / "full.snap")
    await c.call("snapshot.create", {"vm_id": vm_id, "snapshot_type": "Full",
                                     "snapshot_path": snap, "mem_file_path": snap[:-5] + ".mem"})
    return snap, saved


async def test_push_on_one_host_restore_lazy_and_eager_on_another(
    hosts: tuple[Host, Host]
) -> None:
    a, b = hosts
    with trio.fail_after(180):  # hang guard
        async with AsyncClient(a.socket) as ca, AsyncClient(b.socket) as cb:
            snap, saved = await _saved_vm(ca, a.dir)
            seen: list[tuple[str, int, int]] = []
            pushed = await ca.call("store.push", {"snapshot_path": snap, "store": "shared",
                                                  "name": "fleet/src-1", "progress_token": "p"},
                                   on_progress=lambda *v: seen.append(v))
            assert pushed["name"] == "fleet/src-1"
            assert 0 < pushed["chunks_uploaded"] <= pushed["chunks_total"]
            assert pushed["bytes_uploaded"] >= FILL_MIB * MIB  # random filler: incompressible
            assert seen  # $/progress with bytes
            memory = Path(snap[:-5] + ".mem").read_bytes()

            listed = (await cb.call("store.list", {"store": "shared", "prefix": "fleet/"}))
            [entry] = listed["snapshots"]
            assert entry["pair_id"] == pushed["pair_id"] and entry["vm_id"] == "src"
            assert entry["mem_size_bytes"] == 64 * MIB and entry["snapshot_type"] == "Full"

            lazy = await cb.call("store.restore", {"vm_id": "lazy", "store": "shared",
                                                   "name": "fleet/src-1"})
            assert lazy["lazy"] is True and lazy["vm"]["state"] == "Paused"
            assert lazy["vm"]["guest_progress"] == saved
            assert await _read_all(cb, "lazy", 64 * MIB) == memory
            await cb.call("vm.resume", {"vm_id": "lazy"})
            await _progress_beyond(cb, "lazy", saved)  # the guest goes on

            eager = await cb.call("store.restore", {"vm_id": "eager", "store": "shared",
                                                    "name": "fleet/src-1", "lazy": False,
                                                    "resume_vm": True})
            assert eager["lazy"] is False
            await _progress_beyond(cb, "eager", saved)
            await cb.call("vm.pause", {"vm_id": "eager"})
            eager_mem = await _read_all(cb, "eager", 64 * MIB)
            # the counters moved on; everything else is the saved memory
            assert eager_mem[FILL_BASE:] == memory[FILL_BASE:]

            pulled = await cb.call("store.pull", {"store": "shared", "name": "fleet/src-1",
                                                  "snapshot_path": str(b.dir / "p.snap"),
                                                  "mem_file_path": str(b.dir / "p.mem")})
            assert pulled["pair_id"] == pushed["pair_id"]
            assert (b.dir / "p.mem").read_bytes() == memory


async def test_corrupt_chunk_fails_pull_and_puts_lazy_vm_in_error(
    hosts: tuple[Host, Host], ceph: CephCluster
) -> None:
    a, b = hosts
    with trio.fail_after(180):  # hang guard
        async with AsyncClient(a.socket) as ca, AsyncClient(b.socket) as cb:
            snap, _ = await _saved_vm(ca, a.dir)
            await ca.call("store.push", {"snapshot_path": snap, "store": "shared", "name": "bad"})
            # flip one byte of the chunk holding the random filler, in the bucket itself
            bucket = (await _bucket_of(a))
            store = SnapshotStore("shared", s3_config(ceph, bucket, str(a.dir / "x")))
            store = SnapshotStore("shared", _with_prefix(store, "fleet"))
            ref = next(r for r in store.get_snapshot("bad").chunks if r.offset == FILL_BASE)
            key = chunk_key(ref.address)
            data = bytearray(store.objects.get(key) or b"")
            data[len(data) // 2] ^= 0x55
            store.objects.put(key, bytes(data))

            with pytest.raises(SquibdError) as info:
                await cb.call("store.pull", {"store": "shared", "name": "bad",
                                             "snapshot_path": str(b.dir / "p.snap"),
                                             "mem_file_path": str(b.dir / "p.mem")})
            message = info.value.message
            assert ref.address in message and "'bad'" in message
            assert not (b.dir / "p.snap").exists() and not (b.dir / "p.mem").exists()

            await cb.call("store.restore", {"vm_id": "lz", "store": "shared", "name": "bad",
                                            "resume_vm": True})
            with trio.fail_after(60):  # hang guard: streaming reaches the chunk
                while True:
                    info_vm: dict[str, Any] = await cb.call("vm.describe", {"vm_id": "lz"})
                    if info_vm["error"]:
                        break
            assert ref.address in info_vm["error"]


async def _bucket_of(host: Host) -> str:
    text = (host.dir / "squibd.toml").read_text()
    return text.split('url = "s3://', 1)[1].split("/", 1)[0]


def _with_prefix(store: SnapshotStore, prefix: str) -> Any:
    import attrs

    bucket = store.config.url.split("//", 1)[1].split("/", 1)[0]
    return attrs.evolve(store.config, url=f"s3://{bucket}/{prefix}")
