"""``squibctl store ...`` builds the store.* requests; ``[stores.NAME]`` is parsed strictly."""

from __future__ import annotations

import os

import pytest

from squibd.cli.ctl import build_parser, request_of
from squibd.config import ConfigError, parse_config


@pytest.mark.parametrize(("argv", "method", "params"), [
    (["store", "push", "a.snap", "--store", "s", "--name", "x/y"], "store.push",
     {"snapshot_path": os.path.abspath("a.snap"), "store": "s", "name": "x/y"}),
    (["store", "list", "--store", "s"], "store.list", {"store": "s", "prefix": ""}),
    (["store", "pull", "n", "--store", "s", "--snapshot-path", "p.snap",
      "--mem-file-path", "p.mem"], "store.pull",
     {"store": "s", "name": "n", "snapshot_path": os.path.abspath("p.snap"),
      "mem_file_path": os.path.abspath("p.mem")}),
    (["store", "restore", "vm1", "n", "--store", "s", "--eager", "--resume"], "store.restore",
     {"vm_id": "vm1", "store": "s", "name": "n", "lazy": False, "resume_vm": True,
      "track_dirty_pages": False}),
    (["store", "delete", "n", "--store", "s"], "store.delete", {"store": "s", "name": "n"}),
    (["store", "gc", "--store", "s", "--grace-s", "0"], "store.gc", {"store": "s", "grace_s": 0}),
])  # fmt: skip
def test_store_commands(argv: list[str], method: str, params: dict[str, object]) -> None:
    assert request_of(build_parser().parse_args(argv)) == (method, params)


def test_stores_config() -> None:
    config = parse_config({"stores": {"fleet": {
        "url": "s3://bucket/prefix", "endpoint": "http://127.0.0.1:7480",
        "region": "us-east-1", "access_key_id": "a", "secret_access_key": "b",
        "create_bucket": True}}})
    assert config.stores["fleet"].parsed() == ("s3", "bucket", "prefix")
    with pytest.raises(ConfigError, match="scheme must be s3:// or file://"):
        parse_config({"stores": {"x": {"url": "ftp://h/p"}}})
    with pytest.raises(ConfigError, match="bogus"):
        parse_config({"stores": {"x": {"url": "file:///d", "bogus": 1}}})
    with pytest.raises(ConfigError):
        parse_config({"stores": {"x": {}}})
