"""A daemon set up as README shows (``allowed_roots``, no ``cache_dir``) restores from a store.

Regression: restored VMs' state files went to the store's default cache
(``/var/cache/squibd/...`` as root), outside ``allowed_roots``, so every
``store.restore`` failed with InvalidPath; and ``store.list`` said ``vm_id:
null`` for a pair whose VM had saved again since.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from squibd.client import Client
from tests.server.helpers import start_daemon

pytestmark = pytest.mark.kvm


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    roots = tmp_path / "snaps"
    roots.mkdir()
    config = tmp_path / "squibd.toml"
    config.write_text(
        "[server]\n"
        f'state_dir = "{tmp_path / "state"}"\n'
        "[snapshot]\n"
        f'allowed_roots = ["{roots}"]\n'
        "[stores.local]\n"
        f'url = "file://{tmp_path / "store"}"\n'
    )
    proc, sock = start_daemon(str(tmp_path), "--config", str(config))
    try:
        yield sock, roots
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_restore_lazy_and_eager_with_roots_and_the_default_cache(
    daemon: tuple[str, Path], tmp_path: Path
) -> None:
    sock, roots = daemon
    with Client(sock, timeout=120) as c:
        c.vm_create("src", vcpu_count=2, mem_size_mib=64, track_dirty_pages=True)
        c.vm_start("src")
        c.vm_pause("src")
        c.snapshot_create("src", str(roots / "a.snap"), str(roots / "a.mem"))
        c.snapshot_create("src", str(roots / "b.snap"), str(roots / "b.mem"))  # a later save
        c.store_push(str(roots / "a.snap"), "local", "web/a")
        [entry] = c.store_list("local")["snapshots"]
        assert entry["vm_id"] == "src"  # as the state file records it
        lazy = c.store_restore("lazy", "local", "web/a", resume_vm=True)
        assert lazy["lazy"] is True and lazy["vm"]["state"] == "Running"
        eager = c.store_restore("eager", "local", "web/a", lazy=False)
        assert eager["lazy"] is False and eager["vm"]["state"] == "Paused"
        assert c.vm_describe("lazy")["error"] is None
    # squibd's own files for the store are in its state directory.
    assert (tmp_path / "state" / "stores" / "local" / "states").is_dir()
    assert (tmp_path / "state" / "stores" / "local" / "cache").is_dir()
