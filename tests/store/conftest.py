"""Fixtures of the store tests: file:// stores, and a real Ceph RGW for the whole session."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from squibd.store.config import StoreConfig
from squibd.store.store import SnapshotStore

from ._ceph import CephCluster, CephUnavailable, start_ceph

_buckets = itertools.count()


@pytest.fixture
def file_store(tmp_path: Path) -> SnapshotStore:
    """A file:// store with its own chunk cache."""
    config = StoreConfig(url=f"file://{tmp_path / 'store'}", cache_dir=str(tmp_path / "cache"))
    return SnapshotStore("local", config)


@pytest.fixture(scope="session")
def ceph() -> Iterator[CephCluster]:
    """A single-node Ceph (mon + memstore OSD + RGW) under a temporary directory.

    Installed with apt-get when missing (as root); skipped, saying why, where it
    cannot be installed.
    """
    directory = tempfile.mkdtemp(prefix="squibd-ceph-")
    try:
        cluster = start_ceph(directory)
    except CephUnavailable as exc:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.skip(f"no Ceph for the S3 store tests: {exc}")
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(directory, ignore_errors=True)


def s3_config(ceph: CephCluster, bucket: str, cache_dir: str) -> StoreConfig:
    return StoreConfig(
        url=f"s3://{bucket}/snaps",
        endpoint=ceph.endpoint,
        region="us-east-1",
        access_key_id=ceph.access_key,
        secret_access_key=ceph.secret_key,
        create_bucket=True,
        cache_dir=cache_dir,
    )


@pytest.fixture
def s3_store_factory(ceph: CephCluster, tmp_path: Path) -> Callable[[str], SnapshotStore]:
    """Stores on a fresh bucket of the session's Ceph; each call: another host's cache."""
    bucket = f"b{os.getpid()}-{next(_buckets)}"
    hosts = itertools.count()

    def make(name: str = "ceph") -> SnapshotStore:
        cache = tmp_path / f"cache-{next(hosts)}"
        return SnapshotStore(name, s3_config(ceph, bucket, str(cache)))

    return make
