"""The trio server: Unix listener (or socket activation), connections, limits, signals.

Public surface: :class:`Server`, the socket helpers and :class:`Notifier`.
"""

from ._connection import ClientConnection
from ._firecracker import (
    API_SOCKET_MODE,
    FirecrackerSockets,
    HttpApp,
    bind_api_socket,
    serve_http,
)
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
    "API_SOCKET_MODE",
    "LISTEN_BACKLOG",
    "ClientConnection",
    "DaemonAlreadyRunning",
    "FirecrackerSockets",
    "HttpApp",
    "Notifier",
    "PeerCredentials",
    "Server",
    "SocketPathOccupied",
    "bind_api_socket",
    "bind_unix_socket",
    "is_allowed",
    "launchd_sockets",
    "peer_credentials",
    "serve_http",
    "systemd_sockets",
]
