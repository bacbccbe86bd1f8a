"""snapshot.create labels and metadata, snapshot.list and snapshot.delete on real KVM guests."""

from __future__ import annotations

import json
import os
import socket

import pytest

from squibd.client import AsyncClient, SquibdError
from squibd.snapshot.inventory import TOMBSTONE_SUFFIX, finish_deletes, list_pairs
from tests.server.helpers import running_server

pytestmark = pytest.mark.kvm


async def _vm(client: AsyncClient, vm_id: str) -> None:
    await client.vm_create(vm_id, mem_size_mib=32, track_dirty_pages=True)
    await client.vm_start(vm_id)


async def test_labels_list_filters_and_delete_order(sockdir: str) -> None:
    root = os.path.join(sockdir, "snaps")
    os.makedirs(os.path.join(root, "sub"))
    path = f"{sockdir}/s.sock"
    async with running_server(path, allowed_roots=(root,)), AsyncClient(path) as client:
        await _vm(client, "web")
        await _vm(client, "db")
        full = await client.snapshot_create(
            "web", f"{root}/web-full.snap", f"{root}/web-full.mem", labels={"tier": "gold"}
        )
        diff = await client.snapshot_create(
            "web", f"{root}/sub/web-d1.snap", f"{root}/sub/web-d1.mem", snapshot_type="Diff",
            labels={"tier": "gold", "kind": "hourly"},
        )  # fmt: skip
        await client.snapshot_create("db", f"{root}/db.snap", f"{root}/db.mem")

        described = await client.snapshot_describe(f"{root}/web-full.snap")
        assert described["labels"] == {"tier": "gold"}
        assert described["vm_id"] == "web"
        assert described["host"] == socket.gethostname()
        assert described["created_at"].endswith("Z")

        listed = (await client.snapshot_list())["snapshots"]
        assert [s["snapshot_path"] for s in listed] == [
            f"{root}/web-full.snap", f"{root}/sub/web-d1.snap", f"{root}/db.snap",
        ]  # fmt: skip
        first = listed[0]
        assert first["mem_file_path"] == f"{root}/web-full.mem"
        assert first["pair_id"] == full["pair_id"]
        assert first["snapshot_type"] == "Full" and first["parent_pair_id"] is None
        assert listed[1]["parent_pair_id"] == full["pair_id"]
        assert listed[1]["pair_id"] == diff["pair_id"]
        assert first["size_bytes"] > 0
        assert set(first) == {
            "snapshot_path", "mem_file_path", "pair_id", "parent_pair_id", "snapshot_type",
            "vm_id", "created_at", "host", "labels", "size_bytes",
        }  # fmt: skip

        async def paths(**filters: str) -> list[str]:
            result = await client.snapshot_list(**filters)
            return [os.path.basename(s["snapshot_path"]) for s in result["snapshots"]]

        assert await paths(vm_id="db") == ["db.snap"]
        assert await paths(label="kind") == ["web-d1.snap"]
        assert await paths(label="tier=gold") == ["web-full.snap", "web-d1.snap"]
        assert await paths(label="tier=silver") == []
        assert await paths(root=f"{root}/sub") == ["web-d1.snap"]
        with pytest.raises(SquibdError) as outside:
            await client.snapshot_list(root=sockdir)
        assert outside.value.kind == "NotAllowed"

        with pytest.raises(SquibdError) as refused:
            await client.snapshot_delete(f"{root}/web-full.snap")
        assert refused.value.kind == "HasDependents"
        assert f"{root}/sub/web-d1.snap" in refused.value.fault_message
        assert "force" in refused.value.fault_message
        assert os.path.exists(f"{root}/web-full.snap") and os.path.exists(f"{root}/web-full.mem")

        deleted = await client.snapshot_delete(f"{root}/sub/web-d1.snap")
        assert deleted["deleted"] and deleted["mem_file_path"] == f"{root}/sub/web-d1.mem"
        await client.snapshot_delete(f"{root}/web-full.snap")
        assert sorted(os.listdir(root)) == ["db.mem", "db.snap", "sub"]
        assert os.listdir(f"{root}/sub") == []

        with pytest.raises(SquibdError) as missing:
            await client.snapshot_delete(f"{root}/web-full.snap")
        assert missing.value.kind == "InvalidPath"
        assert f"{root}/web-full.snap" in missing.value.fault_message

        with pytest.raises(SquibdError) as bad_labels:
            await client.snapshot_create("db", f"{root}/x.snap", f"{root}/x.mem",
                                         labels={"bad key": "v"})  # fmt: skip
        assert bad_labels.value.code == -32602
        assert "labels" in bad_labels.value.fault_message


async def test_force_delete_and_an_interrupted_delete_is_finished(sockdir: str) -> None:
    root = os.path.join(sockdir, "snaps")
    os.makedirs(root)
    path = f"{sockdir}/s.sock"
    async with running_server(path, allowed_roots=(root,)), AsyncClient(path) as client:
        await _vm(client, "a")
        await client.snapshot_create("a", f"{root}/a.snap", f"{root}/a.mem")
        await client.snapshot_create("a", f"{root}/a1.snap", f"{root}/a1.mem",
                                     snapshot_type="Diff")  # fmt: skip
        await client.snapshot_delete(f"{root}/a.snap", force=True)
        left = (await client.snapshot_list())["snapshots"]
        assert [s["snapshot_path"] for s in left] == [f"{root}/a1.snap"]

    # A crash right after the tombstone was made durable: the state file and the
    # memory file are still there (fake crash: the tombstone is written by hand).
    with open(f"{root}/.a1.snap{TOMBSTONE_SUFFIX}", "w") as f:
        json.dump({"snapshot_path": f"{root}/a1.snap", "mem_file_path": f"{root}/a1.mem"}, f)
    assert list_pairs([root]) == []  # listing finishes it first
    assert os.listdir(root) == []
    assert finish_deletes(root) == 0
