"""Getting a listening Unix socket: bind our own, or receive one from the service manager.

* :func:`bind_unix_socket` refuses when a live daemon answers on the path,
  replaces a stale socket file, never removes anything that is not a
  socket, and creates the socket with the configured mode from the start
  (the umask is narrowed around ``bind``, so there is no window at 0777).
* :func:`systemd_sockets` implements sd_listen_fds(3): ``$LISTEN_PID`` must
  be our pid; the sockets are fds 3 .. 3 + ``$LISTEN_FDS`` - 1.
* :func:`launchd_sockets` calls launch_activate_socket(3) through ctypes,
  imported only on macOS.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
from collections.abc import MutableMapping
from typing import Final

from squibd.snapshot.paths import validate_path

__all__ = [
    "LISTEN_BACKLOG",
    "DaemonAlreadyRunning",
    "SocketPathOccupied",
    "bind_unix_socket",
    "launchd_sockets",
    "systemd_sockets",
]

#: sd_listen_fds(3): the first passed fd is SD_LISTEN_FDS_START = 3.
SD_LISTEN_FDS_START: Final = 3
#: listen(2) backlog; the kernel caps it at net.core.somaxconn.
LISTEN_BACKLOG: Final = 512
#: How long to wait for a daemon that may own an existing socket to accept.
_PROBE_TIMEOUT_S: Final = 1.0
#: Permission bits the umask clears while binding, so the socket starts at 0600 or less.
_BIND_UMASK: Final = 0o177
#: Mode of a socket directory we create (/run/squibd).
_DIR_MODE: Final = 0o755


class DaemonAlreadyRunning(Exception):
    """Another process accepts connections on the socket path: refuse to start."""

    def __init__(self, path: str) -> None:
        super().__init__(
            f"a daemon is already listening on {path}; stop it or pass another --socket"
        )
        self.path = path


class SocketPathOccupied(Exception):
    """The socket path exists and is not a socket: we will not remove it."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} exists and is not a socket; remove it or pass another --socket")
        self.path = path


def _remove_if_stale(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise SocketPathOccupied(path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PROBE_TIMEOUT_S)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # stale: nobody listens
            return
        except TimeoutError:
            pass  # a listener whose backlog is full is alive
    raise DaemonAlreadyRunning(path)


def bind_unix_socket(path: str, *, mode: int, group: str | None = None) -> socket.socket:
    """Create, bind and listen on a Unix stream socket at ``path``.

    Raises:
        InvalidPath: the path breaks SPEC section 10 (107 bytes for a socket).
        DaemonAlreadyRunning, SocketPathOccupied: see their docs.
        OSError: bind/listen failed (permissions, missing parent we cannot create).
    """
    validate_path(path, what="socket", socket=True)
    _remove_if_stale(path)
    os.makedirs(os.path.dirname(path), mode=_DIR_MODE, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old_umask = os.umask(_BIND_UMASK | (~mode & 0o777))
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, mode)
        if group is not None:
            import grp

            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def systemd_sockets(environ: MutableMapping[str, str] | None = None) -> list[socket.socket]:
    """The sockets systemd passed us (sd_listen_fds(3)); ``[]`` when not activated.

    The ``LISTEN_*`` variables are removed so that children do not inherit them.
    """
    env = os.environ if environ is None else environ
    pid = env.get("LISTEN_PID", "")
    count = env.get("LISTEN_FDS", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def launchd_sockets(name: str = "Listeners") -> list[socket.socket]:
    """The sockets launchd created for the ``Sockets`` entry ``name`` (macOS only).

    Returns ``[]`` elsewhere, or when the job was not started by launchd.
    """
    if sys.platform != "darwin":
        return []
    import ctypes  # pragma: no cover - macOS only

    libc = ctypes.CDLL(None)  # pragma: no cover
    fds = ctypes.POINTER(ctypes.c_int)()  # pragma: no cover
    count = ctypes.c_size_t(0)  # pragma: no cover
    rc = libc.launch_activate_socket(  # pragma: no cover
        name.encode(), ctypes.byref(fds), ctypes.byref(count)
    )
    if rc != 0:  # pragma: no cover - ESRCH: not managed by launchd
        return []
    try:  # pragma: no cover
        return [socket.socket(fileno=fds[i]) for i in range(count.value)]
    finally:  # pragma: no cover
        libc.free(fds)
