"""Snapshot stores against a real Ceph RGW started for the run (issue 12).

Figures (one run, one Ceph):
- ``clients``: the client library choice. Plain parallel PUT and GET of the
  same random 2 MiB objects (4 requests in flight) with obstore and with
  boto3, MB/s. squibd uses obstore.
- ``push``/``pull``: ``SnapshotStore.push`` of a Full pair of random content
  (1 GiB; 256 MiB with --quick) and ``pull`` of it into a fresh host (empty
  chunk cache), MB/s, against the client library's plain parallel upload and
  download of the same bytes as 2 MiB objects (``ratio`` = ours / plain).
- ``dedup``: a 1 GiB memwriter guest holding 768 MiB of random content it
  never rewrites while rewriting a 16 MiB working set; ten successive Full
  snapshots each pushed; ``ratio`` = bytes stored by the ten / by the first
  (--quick: 256 MiB guest, 192 MiB static, 4 MiB working set).
- ``lazy_restore``: ``store.restore`` (lazy, resume_vm) on a second daemon
  with an empty cache, request to answer (the guest is running then), for
  1 GiB and 4 GiB counter guests (256 MiB and 1 GiB with --quick).
"""

from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import _common

REPO = str(Path(__file__).resolve().parent.parent)
sys.path.insert(0, REPO)

MIB = 1024 * 1024
CHUNK = 2 * MIB
WORKERS = 4


def _pair(directory: str, name: str, size: int) -> str:
    """A committed-looking Full pair of random content, written directly."""
    from squibd.snapshot.digest import manifest_digests
    from squibd.snapshot.envelope import encode_state
    from squibd.snapshot.manifest import (
        DEFAULT_CHUNK_SIZE,
        KIND_FULL,
        Extent,
        MemoryManifest,
        MemoryRegion,
    )
    from squibd.snapshot.minimal import minimal_x86_state, minimal_x86_vcpu
    from squibd.snapshot.pairing import new_pair_id, set_pair_xattr

    mem = os.path.join(directory, f"{name}.mem")
    fd = os.open(mem, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        _common.fill_random_fd(fd, size)
        pair = new_pair_id()
        set_pair_xattr(fd, pair)
        extents = (Extent(0, size),)
        digests = manifest_digests(lambda o, n: os.pread(fd, n, o), extents,
                                   algorithm="xxh3-64")
    finally:
        os.close(fd)
    manifest = MemoryManifest(os.sysconf("SC_PAGE_SIZE"), (MemoryRegion(0, size, 0),),
                              KIND_FULL, size, pair, None, extents, "xxh3-64",
                              DEFAULT_CHUNK_SIZE, digests)
    snap = os.path.join(directory, f"{name}.snap")
    vcpu = minimal_x86_vcpu(rip=0x1000)
    with open(snap, "wb") as f:
        f.write(encode_state(minimal_x86_state(manifest, (vcpu,))))
    return snap


def _obstore(cluster: Any, bucket: str) -> Any:
    from obstore.store import S3Store

    return S3Store(bucket, endpoint=cluster.endpoint, access_key_id=cluster.access_key,
                   secret_access_key=cluster.secret_key, region="us-east-1",
                   virtual_hosted_style_request=False, client_options={"allow_http": True})


def _boto(cluster: Any) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=cluster.endpoint, region_name="us-east-1",
                        aws_access_key_id=cluster.access_key,
                        aws_secret_access_key=cluster.secret_key)


def _plain_put(store: Any, prefix: str, path: str, size: int) -> float:
    import obstore

    fd = os.open(path, os.O_RDONLY)
    try:
        def one(i: int) -> None:
            obstore.put(store, f"{prefix}/{i}", os.pread(fd, CHUNK, i * CHUNK))

        t0 = time.perf_counter()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(one, range(size // CHUNK)))
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _plain_get(store: Any, prefix: str, path: str, size: int) -> float:
    import obstore

    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)

        def one(i: int) -> None:
            os.pwrite(fd, bytes(obstore.get(store, f"{prefix}/{i}").bytes()), i * CHUNK)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(one, range(size // CHUNK)))
        return time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)


def _clients(cluster: Any, size: int, reps: int) -> dict[str, Any]:
    import obstore

    store = _obstore(cluster, "bench-clients")
    boto = _boto(cluster)
    boto.create_bucket(Bucket="bench-clients")
    blobs = [os.urandom(CHUNK) for _ in range(size // CHUNK)]
    out: dict[str, Any] = {"object_mib": 2, "in_flight": WORKERS, "mib": size // MIB}
    for name, put, get in (
        ("obstore", lambda k, b: obstore.put(store, k, b),
         lambda k: bytes(obstore.get(store, k).bytes())),
        ("boto3", lambda k, b: boto.put_object(Bucket="bench-clients", Key=k, Body=b),
         lambda k: boto.get_object(Bucket="bench-clients", Key=k)["Body"].read()),
    ):
        puts, gets = [], []
        for rep in range(reps):
            keys = [f"{name}/{rep}/{i}" for i in range(len(blobs))]
            with ThreadPoolExecutor(WORKERS) as pool:
                t0 = time.perf_counter()
                list(pool.map(put, keys, blobs))
                puts.append(size / MIB / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                list(pool.map(get, keys))
                gets.append(size / MIB / (time.perf_counter() - t0))
                list(pool.map(lambda k: obstore.delete(store, k), keys))
        out[name] = {"put_mib_s": _common.summarize(puts).to_dict(digits=1),
                     "get_mib_s": _common.summarize(gets).to_dict(digits=1)}
    return out


def _throughput(cluster: Any, work: str, size: int, reps: int) -> dict[str, Any]:
    from squibd.store.config import StoreConfig
    from squibd.store.store import SnapshotStore

    def config(cache: str) -> StoreConfig:
        return StoreConfig(url="s3://bench-tp/s", endpoint=cluster.endpoint,
                           region="us-east-1", access_key_id=cluster.access_key,
                           secret_access_key=cluster.secret_key, create_bucket=True,
                           cache_dir=cache, max_requests=WORKERS)

    plain = _obstore(cluster, "bench-tp")
    push, pull, plain_put, plain_get = [], [], [], []
    for rep in range(reps + 1):  # the first is a warm-up (new pool, new bucket index)
        snap = _pair(work, f"tp{rep}", size)
        pusher = SnapshotStore("b", config(os.path.join(work, f"c-push-{rep}")))
        t0 = time.perf_counter()
        pusher.push(snap, f"tp/{rep}")
        t_push = time.perf_counter() - t0
        t_plain_put = _plain_put(plain, f"plain/{rep}", snap[:-5] + ".mem", size)
        puller = SnapshotStore("b", config(os.path.join(work, f"c-pull-{rep}")))
        t0 = time.perf_counter()
        puller.pull(f"tp/{rep}", os.path.join(work, "p.snap"), os.path.join(work, "p.mem"))
        t_pull = time.perf_counter() - t0
        t_plain_get = _plain_get(plain, f"plain/{rep}", os.path.join(work, "g.mem"), size)
        for path in ("p.snap", "p.mem", f"tp{rep}.snap", f"tp{rep}.mem"):
            os.unlink(os.path.join(work, path))
        shutil.rmtree(os.path.join(work, f"c-pull-{rep}"))
        shutil.rmtree(os.path.join(work, f"c-push-{rep}"))
        pusher.delete(f"tp/{rep}")
        pusher.gc(0)
        import obstore
        obstore.delete(plain, [f"plain/{rep}/{i}" for i in range(size // CHUNK)])
        if rep:
            push.append(size / MIB / t_push)
            pull.append(size / MIB / t_pull)
            plain_put.append(size / MIB / t_plain_put)
            plain_get.append(size / MIB / t_plain_get)
        _common.log(f"store: rep {rep}: push {size / MIB / t_push:.0f} MiB/s "
                    f"(plain {size / MIB / t_plain_put:.0f}), pull {size / MIB / t_pull:.0f} "
                    f"(plain {size / MIB / t_plain_get:.0f})")
    stats = {k: _common.summarize(v) for k, v in
             (("push", push), ("pull", pull), ("plain_put", plain_put), ("plain_get", plain_get))}
    return {
        "mib": size // MIB,
        "push_mib_s": stats["push"].to_dict(digits=1),
        "plain_upload_mib_s": stats["plain_put"].to_dict(digits=1),
        "push_ratio": _common.ratio(stats["push"].median, stats["plain_put"].median),
        "pull_mib_s": stats["pull"].to_dict(digits=1),
        "plain_download_mib_s": stats["plain_get"].to_dict(digits=1),
        "pull_ratio": _common.ratio(stats["pull"].median, stats["plain_get"].median),
    }


async def _write_random(c: Any, vm_id: str, base: int, size: int) -> None:
    piece = 512 * 1024
    for i in range(size // piece):
        await c.call("vm.write_memory", {"vm_id": vm_id, "guest_addr": base + i * piece,
                                         "data_base64": base64.b64encode(
                                             os.urandom(piece)).decode()})


async def _dedup(cluster: Any, work: str, quick: bool) -> dict[str, Any]:
    from squibd.client import AsyncClient
    from tests.store.test_store_hosts import Host, _progress_beyond

    mem_mib, static_mib, ws_mib = (256, 192, 4) if quick else (1024, 768, 16)
    host = Host(Path(work) / "dedup", cluster, "bench-dedup")
    try:
        async with AsyncClient(host.socket) as c:
            await c.call("vm.create", {"vm_id": "mw", "vcpu_count": 1, "mem_size_mib": mem_mib,
                                       "track_dirty_pages": True,
                                       "guest": {"program": "memwriter",
                                                 "working_set_mib": ws_mib}})
            await _write_random(c, "mw", 64 * MIB, static_mib * MIB)
            await c.call("vm.start", {"vm_id": "mw"})
            progress = await _progress_beyond(c, "mw", [0])
            uploaded = []
            for i in range(10):
                snap = os.path.join(work, "dedup", f"f{i}.snap")
                await c.call("snapshot.create", {"vm_id": "mw", "snapshot_type": "Full",
                                                 "snapshot_path": snap,
                                                 "mem_file_path": snap[:-5] + ".mem"})
                r = await c.call("store.push", {"snapshot_path": snap, "store": "shared",
                                                "name": f"mw/{i}"})
                uploaded.append(r["bytes_uploaded"])
                os.unlink(snap)
                os.unlink(snap[:-5] + ".mem")
                progress = await _progress_beyond(c, "mw", progress)
    finally:
        host.stop()
    return {"mem_mib": mem_mib, "static_mib": static_mib, "working_set_mib": ws_mib,
            "pushes": 10, "first_bytes": uploaded[0], "total_bytes": sum(uploaded),
            "ratio": _common.ratio(sum(uploaded), uploaded[0])}


async def _lazy(cluster: Any, work: str, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    import trio

    from squibd.client import AsyncClient
    from tests.store.test_store_hosts import Host, _progress_beyond

    a = Host(Path(work) / "la", cluster, "bench-lazy")
    b = Host(Path(work) / "lb", cluster, "bench-lazy")
    out = []
    try:
        async with AsyncClient(a.socket) as ca, AsyncClient(b.socket) as cb:
            for mib in sizes:
                vm = f"src{mib}"
                await ca.call("vm.create", {"vm_id": vm, "vcpu_count": 1, "mem_size_mib": mib,
                                            "track_dirty_pages": False,
                                            "guest": {"program": "counter"}})
                await _write_random(ca, vm, 64 * MIB, 16 * MIB)
                await ca.call("vm.start", {"vm_id": vm})
                saved = await _progress_beyond(ca, vm, [0])
                await ca.call("vm.pause", {"vm_id": vm})
                snap = os.path.join(work, f"l{mib}.snap")
                await ca.call("snapshot.create", {"vm_id": vm, "snapshot_type": "Full",
                                                  "snapshot_path": snap,
                                                  "mem_file_path": snap[:-5] + ".mem"})
                await ca.call("store.push", {"snapshot_path": snap, "store": "shared",
                                             "name": f"lazy/{mib}"})
                await ca.call("vm.destroy", {"vm_id": vm})
                await cb.call("store.list", {"store": "shared"})  # starts the spare
                wall, reported = [], []
                for rep in range(reps + 1):
                    shutil.rmtree(Path(work) / "lb" / "cache" / "chunks", ignore_errors=True)
                    await trio.sleep(3)  # the spare page-server process gets ready
                    t0 = time.perf_counter()
                    r = await cb.call("store.restore", {"vm_id": f"r{rep}", "store": "shared",
                                                        "name": f"lazy/{mib}",
                                                        "resume_vm": True})
                    elapsed = time.perf_counter() - t0
                    await _progress_beyond(cb, f"r{rep}", saved)
                    await cb.call("vm.destroy", {"vm_id": f"r{rep}"})
                    if rep:
                        wall.append(elapsed * 1000)
                        reported.append(r["duration_ms"])
                out.append({"mem_mib": mib,
                            "restore_to_running_ms": _common.summarize(wall).to_dict(digits=2),
                            "daemon_duration_ms": _common.summarize(reported).to_dict(digits=2)})
                os.unlink(snap)
                os.unlink(snap[:-5] + ".mem")
    finally:
        b.stop()
        a.stop()
    return out


def main(args: Any) -> dict[str, Any]:
    import trio

    from tests.store._ceph import CephUnavailable, start_ceph

    if not _common.kvm_available():
        _common.skip("store", "no /dev/kvm")
    size = (256 if args.quick else 1024) * MIB
    ceph_dir = tempfile.mkdtemp(prefix="squibd-bench-ceph-")
    try:
        cluster = start_ceph(ceph_dir, memstore_bytes=(6 if args.quick else 10) << 30)
    except CephUnavailable as exc:
        shutil.rmtree(ceph_dir, ignore_errors=True)
        _common.skip("store", str(exc))
    try:
        with _common.scratch_dir() as work:
            result: dict[str, Any] = {"hash": "blake3", "client": "obstore"}
            parts = args.parts.split(",")
            if "clients" in parts:
                result["clients"] = _clients(cluster, 128 * MIB if args.quick else 256 * MIB,
                                             args.reps)
                _common.log(f"store: clients {result['clients']}")
            if "throughput" in parts:
                result["throughput"] = _throughput(cluster, work, size, args.reps)
            if "dedup" in parts:
                result["dedup"] = trio.run(_dedup, cluster, work, args.quick)
                _common.log(f"store: dedup {result['dedup']}")
            if "lazy" in parts:
                sizes = [256, 1024] if args.quick else [1024, 4096]
                result["lazy_restore"] = trio.run(_lazy, cluster, work, sizes, args.reps)
            return result
    finally:
        cluster.stop()
        shutil.rmtree(ceph_dir, ignore_errors=True)


if __name__ == "__main__":
    _common.run_bench("store", main, _common.parse_args(
        __doc__ or "", extra=lambda p: p.add_argument(
            "--parts", default="clients,throughput,dedup,lazy", help="comma-separated figures")))
