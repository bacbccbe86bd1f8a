"""The operator keys of ``[server]``: on_shutdown, state_dir, metrics_address, log_format."""

from __future__ import annotations

import os

import pytest

from squibd.config import ConfigError, default_state_dir, parse_config
from squibd.metrics import parse_address


def test_defaults() -> None:
    server = parse_config({}).server
    assert (server.on_shutdown, server.metrics_address, server.log_format) == (
        "keep", None, "text",
    )  # fmt: skip
    assert server.effective_state_dir() == default_state_dir()


def test_every_key_parses() -> None:
    server = parse_config({"server": {"on_shutdown": "save", "state_dir": "/srv/sq",
                                      "metrics_address": "[::1]:9464",
                                      "log_format": "json"}}).server  # fmt: skip
    assert server.on_shutdown == "save" and server.effective_state_dir() == "/srv/sq"
    assert parse_address(server.metrics_address or "") == ("::1", 9464)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("on_shutdown", "hibernate", "on_shutdown"), ("metrics_address", "9464", "HOST:PORT"),
     ("metrics_address", "h:99999", "HOST:PORT"), ("log_format", "xml", "log_format")],
)  # fmt: skip
def test_bad_values_are_refused_by_name(key: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"server": {key: value}})


def test_state_dir_defaults() -> None:
    if os.geteuid() == 0:
        assert default_state_dir({}) == "/var/lib/squibd/state"
    else:
        assert default_state_dir({"XDG_STATE_HOME": "/x"}) == "/x/squibd"
        assert default_state_dir({"HOME": "/h"}) == "/h/.local/state/squibd"
