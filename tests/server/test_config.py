"""Configuration: defaults, TOML parsing, strictness; the peer allow list."""

from __future__ import annotations

import os

import pytest

from squibd.config import (
    DEFAULT_MAX_CONNECTIONS,
    ConfigError,
    DaemonConfig,
    default_socket_path,
    load_config,
)
from squibd.server import PeerCredentials, is_allowed


def _write(directory: str, text: str) -> str:
    path = os.path.join(directory, "squibd.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def test_defaults_follow_spec_and_issue() -> None:
    config = load_config(None)
    assert config == DaemonConfig()
    assert config.server.socket_mode == 0o600
    assert config.server.max_connections == DEFAULT_MAX_CONNECTIONS == 256
    assert config.server.max_in_flight == 16
    assert config.server.max_line_bytes == 1024 * 1024
    assert config.server.effective_allowed_uids() == {os.getuid(), 0}


def test_full_file_is_parsed(sockdir: str) -> None:
    path = _write(sockdir, """
[server]
socket = "/run/x.sock"
socket_mode = "0660"
socket_group = "kvm"
allowed_uids = [1000]
allowed_gids = [27]
idle_timeout_s = 5
debug_api = true
log_level = "debug"
[snapshot]
allowed_roots = ["/var/lib/squibd"]
quiesce_timeout_s = 0.5
""")
    config = load_config(path)
    assert config.server.socket == "/run/x.sock"
    assert config.server.socket_mode == 0o660
    assert config.server.effective_allowed_uids() == {1000}
    assert config.server.allowed_gids == (27,)
    assert config.server.idle_timeout_s == 5
    assert config.snapshot.allowed_roots == ("/var/lib/squibd",)
    assert config.snapshot.quiesce_timeout_s == 0.5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[server]\nsokcet = 1\n", "sokcet"),
        ("[server]\nmax_in_flight = -1\n", "max_in_flight must be positive"),
        ("[server]\nmax_connections = true\n", "max_connections"),
        ("[server]\nlog_level = \"loud\"\n", "config.server"),
        ("[server\n", "not valid TOML"),
        ("[elsewhere]\n", "elsewhere"),
    ],
)
def test_bad_files_are_refused_with_a_clear_message(sockdir: str, text: str,
                                                    needle: str) -> None:  # fmt: skip
    with pytest.raises(ConfigError) as info:
        load_config(_write(sockdir, text))
    assert needle in str(info.value)


def test_missing_file_is_a_config_error(sockdir: str) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(os.path.join(sockdir, "absent.toml"))


def test_default_socket_path() -> None:
    assert default_socket_path({"XDG_RUNTIME_DIR": "/run/user/7"}) == "/run/user/7/squibd.sock"
    assert default_socket_path({}) == "/run/squibd/squibd.sock"


def test_allow_list_by_uid_or_gid() -> None:
    peer = PeerCredentials(pid=10, uid=1000, gid=27)
    assert is_allowed(peer, {1000})
    assert is_allowed(peer, {0}, {27})
    assert not is_allowed(peer, {0}, {28})
