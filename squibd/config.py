"""squibd's TOML configuration, validated into frozen attrs models.

Every key is optional; the defaults are those of SPEC sections 9 and 10
and issue 5. Example (all keys)::

    [server]
    socket = "/run/squibd/squibd.sock"
    socket_mode = 0o600           # or "0600"
    socket_group = "kvm"          # group owner of the socket (mode 0660 then makes sense)
    allowed_uids = [0, 1000]      # default: the daemon's own uid and root
    allowed_gids = []             # peers whose gid is listed are allowed too
    max_connections = 256
    max_in_flight = 16            # requests in flight per connection
    idle_timeout_s = 300
    max_line_bytes = 1048576
    shutdown_grace_s = 30
    debug_api = false
    log_level = "info"
    log_format = "text"           # or "json" (one JSON object per line)
    state_dir = "/var/lib/squibd/state"  # journals + their key, shutdown saves; created 0700
    on_shutdown = "keep"          # "keep" | "save" | "stop" (see README "Host shutdown")
    metrics_address = "127.0.0.1:9464"    # Prometheus listener; absent = off
    vm_isolation = "process"      # one VM process per VM; "inprocess": VMs inside the daemon
    stop_vms_on_exit = false      # VM processes outlive the daemon; a new one re-attaches
    vm_user = "nobody"            # VM processes drop to this user ("" keeps root)
    vm_seccomp = true             # and apply their seccomp filter

    [snapshot]
    allowed_roots = ["/var/lib/squibd"]
    quiesce_timeout_s = 1.0

    [limits]                      # issue 10: refused with -32004 naming the limit
    max_vms = 128
    max_vcpus_total = 1024
    max_guest_memory_mib = 24576  # default: the host's RAM
    fd_reserve = 64               # fds kept free for connections when VMs use the rest
    [stores.NAME]                 # snapshot stores (issue 12; squibd.store.config)
    url = "s3://BUCKET/PREFIX"    # or "file:///abs/dir"
    endpoint = "http://127.0.0.1:7480"
"""

from __future__ import annotations

import os
import tomllib
from typing import Any, Final

import attrs
import cattrs
from cattrs.v import format_exception

from squibd.rpc import DEFAULT_MAX_LINE
from squibd.snapshot.statedir import default_state_dir
from squibd.store.config import StoreConfig
from squibd.vm.models import DEFAULT_VM_ISOLATION, VM_ISOLATION_MODES

__all__ = [
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_SHUTDOWN_GRACE_S",
    "DEFAULT_SOCKET_MODE",
    "ConfigError",
    "DaemonConfig",
    "LimitsConfig",
    "ServerConfig",
    "SnapshotConfig",
    "default_socket_path",
    "default_state_dir",
    "load_config",
]

#: SPEC section 10: the socket is created with mode 0600 by default.
DEFAULT_SOCKET_MODE: Final = 0o600
#: Issue 5: at most 256 connections at once.
DEFAULT_MAX_CONNECTIONS: Final = 256
#: Issue 5: at most 16 requests in flight per connection.
DEFAULT_MAX_IN_FLIGHT: Final = 16
#: A connection with nothing in flight and nothing received for this long is closed.
DEFAULT_IDLE_TIMEOUT_S: Final = 300.0
#: SIGTERM lets in-flight saves finish for at most this long.
DEFAULT_SHUTDOWN_GRACE_S: Final = 30.0
#: Issue 5: the socket of a root daemon without $XDG_RUNTIME_DIR.
SYSTEM_SOCKET_PATH: Final = "/run/squibd/squibd.sock"
_SOCKET_NAME: Final = "squibd.sock"
_LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_LOG_FORMATS: Final = ("text", "json")
#: ``[server] on_shutdown``: what a SIGTERM does to the VMs (issue 13).
ON_SHUTDOWN_MODES: Final = ("keep", "save", "stop")


class ConfigError(Exception):
    """The configuration file is unreadable, not TOML, or has a bad key or value."""


def default_socket_path(environ: dict[str, str] | None = None) -> str:
    """``$XDG_RUNTIME_DIR/squibd.sock``, else ``/run/squibd/squibd.sock``."""
    env = os.environ if environ is None else environ
    runtime_dir = env.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, _SOCKET_NAME)
    return SYSTEM_SOCKET_PATH


def _host_port(instance: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None:
        return
    _host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{attribute.name} must be HOST:PORT, got {value!r}")


def _positive(instance: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value}")


def _mode(value: Any) -> int:
    if isinstance(value, str):
        value = int(value, 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0o777:
        raise ValueError(f"socket_mode must be an octal permission like 0o600, got {value!r}")
    return value


def _absolute_dir(value: Any) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"state_dir must be a non-empty path, got {value!r}")
    return os.path.abspath(value)


@attrs.frozen
class ServerConfig:
    """``[server]``: the socket, who may connect, limits, logging."""

    socket: str | None = None
    socket_mode: int = attrs.field(default=DEFAULT_SOCKET_MODE, converter=_mode)
    socket_group: str | None = None
    allowed_uids: tuple[int, ...] | None = None
    allowed_gids: tuple[int, ...] = ()
    max_connections: int = attrs.field(default=DEFAULT_MAX_CONNECTIONS, validator=_positive)
    max_in_flight: int = attrs.field(default=DEFAULT_MAX_IN_FLIGHT, validator=_positive)
    idle_timeout_s: float = attrs.field(default=DEFAULT_IDLE_TIMEOUT_S, validator=_positive)
    max_line_bytes: int = attrs.field(default=DEFAULT_MAX_LINE, validator=_positive)
    shutdown_grace_s: float = attrs.field(default=DEFAULT_SHUTDOWN_GRACE_S, validator=_positive)
    debug_api: bool = False
    log_level: str = attrs.field(default="info", validator=attrs.validators.in_(_LOG_LEVELS))
    #: squibd's private state directory (commit journals and their HMAC key), as an
    #: absolute path: ``/var/lib/squibd/state`` for root, else ``$XDG_STATE_HOME/squibd``
    #: (``~/.local/state/squibd``). ``squibd --state-dir`` overrides it.
    state_dir: str = attrs.field(factory=default_state_dir, converter=_absolute_dir)
    log_format: str = attrs.field(default="text", validator=attrs.validators.in_(_LOG_FORMATS))
    on_shutdown: str = attrs.field(
        default="keep", validator=attrs.validators.in_(ON_SHUTDOWN_MODES)
    )
    metrics_address: str | None = attrs.field(default=None, validator=_host_port)

    def effective_state_dir(self) -> str:
        """The state directory (always set: ``state_dir`` defaults to :func:`default_state_dir`)."""
        return self.state_dir
    #: Issue 11: run each VM in its own VM process ("process") or in the daemon ("inprocess").
    vm_isolation: str = attrs.field(
        default=DEFAULT_VM_ISOLATION, validator=attrs.validators.in_(VM_ISOLATION_MODES)
    )
    #: Issue 11: whether VM processes stop with the daemon (else a new daemon re-attaches).
    stop_vms_on_exit: bool = False
    #: Issue 11: VM processes drop to this user (name or uid; "" keeps root) and apply seccomp.
    vm_user: str = "nobody"
    vm_seccomp: bool = True

    def effective_allowed_uids(self) -> frozenset[int]:
        """The allow list: configured uids, else the daemon's own uid and root."""
        if self.allowed_uids is not None:
            return frozenset(self.allowed_uids)
        return frozenset({os.getuid(), 0})


@attrs.frozen
class SnapshotConfig:
    """``[snapshot]``: where clients may put snapshots, quiesce timeout."""

    allowed_roots: tuple[str, ...] | None = None
    quiesce_timeout_s: float | None = None


def _optional_positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{attribute.name} must be at least 1, got {value}")


def _not_negative(instance: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must not be negative, got {value}")


@attrs.frozen
class LimitsConfig:
    """``[limits]``: what the VM runtime admits (None: its default, see ``squibd.vm.limits``)."""

    max_vms: int | None = attrs.field(default=None, validator=_optional_positive)
    max_vcpus_total: int | None = attrs.field(default=None, validator=_optional_positive)
    max_guest_memory_mib: int | None = attrs.field(default=None, validator=_optional_positive)
    fd_reserve: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_not_negative)
    )


@attrs.frozen
class DaemonConfig:
    """The whole configuration file."""

    server: ServerConfig = attrs.field(factory=ServerConfig)
    snapshot: SnapshotConfig = attrs.field(factory=SnapshotConfig)
    limits: LimitsConfig = attrs.field(factory=LimitsConfig)
    stores: dict[str, StoreConfig] = attrs.field(factory=dict)


def _converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, prefer_attrib_converters=True)
    converter.register_structure_hook(int, lambda v, _: _strict_int(v))
    converter.register_structure_hook(bool, lambda v, _: _strict_bool(v))
    return converter


def _strict_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _format_problem(exc: BaseException, type_: type | None) -> str:
    if type(exc) is ValueError:  # our validators and converters: their message says it all
        return str(exc)
    return format_exception(exc, type_)


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def parse_config(data: dict[str, Any]) -> DaemonConfig:
    """Validate decoded TOML into a :class:`DaemonConfig`.

    Raises:
        ConfigError: naming the offending keys.
    """
    try:
        return _converter().structure(data, DaemonConfig)
    except Exception as exc:
        details = "; ".join(
            cattrs.transform_error(exc, path="config", format_exception=_format_problem)
        )
        raise ConfigError(f"invalid configuration: {details}") from exc


def load_config(path: str | None) -> DaemonConfig:
    """Read and validate ``path`` (``None``: all defaults).

    Raises:
        ConfigError: unreadable file, bad TOML, unknown key or bad value.
    """
    if path is None:
        return DaemonConfig()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"configuration {path} is not valid TOML: {exc}") from exc
    return parse_config(data)
