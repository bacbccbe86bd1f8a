"""The trio server: Unix listener (or socket activation), connections, limits, signals.

Public surface: :class:`Server`, the socket helpers and :class:`Notifier`.
"""

from ._connection import ClientConnection
from ._listener import (
    LISTEN_BACKLOG,
    DaemonAlreadyRunning,
    SocketPathOccupied,
    bind_unix_socket,
    launchd_sockets,
    systemd_sockets,
)
from ._notify import Notifier
from ._peercred import PeerCredentials, is_allowed, peer_credentials
from ._server import Server

__all__ = [
    "LISTEN_BACKLOG",
    "ClientConnection",
    "DaemonAlreadyRunning",
    "Notifier",
    "PeerCredentials",
    "Server",
    "SocketPathOccupied",
    "bind_unix_socket",
    "is_allowed",
    "launchd_sockets",
    "peer_credentials",
    "systemd_sockets",
]
