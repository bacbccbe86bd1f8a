"""Who is on the other end of a Unix socket: ``SO_PEERCRED`` (SPEC section 10)."""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Collection
from typing import Final

import attrs

__all__ = ["PeerCredentials", "is_allowed", "peer_credentials"]

# linux/socket.h: struct ucred { pid_t pid; uid_t uid; gid_t gid; }.
_UCRED: Final = struct.Struct("iII")
# asm-generic/socket.h: SO_PEERCRED = 17 (socket.SO_PEERCRED where Python exposes it).
_SO_PEERCRED: Final = getattr(socket, "SO_PEERCRED", 17)
# macOS sys/un.h: SOL_LOCAL = 0, LOCAL_PEERPID = 2; getpeereid(3) gives uid/gid.
_SOL_LOCAL: Final = 0
_LOCAL_PEERPID: Final = 2
_PID_SIZE: Final = 4


@attrs.frozen
class PeerCredentials:
    """The peer process's pid, uid and gid, as the kernel reports them."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid={self.pid} uid={self.uid} gid={self.gid}"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Read the credentials of a connected Unix socket's peer.

    Raises:
        OSError: the kernel would not say (not a Unix socket, peer gone).
    """
    if sys.platform == "darwin":  # pragma: no cover - macOS only
        return _darwin_credentials(sock)
    raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid)


def _darwin_credentials(sock: socket.socket) -> PeerCredentials:  # pragma: no cover
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    uid = ctypes.c_uint32()
    gid = ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        raise OSError(ctypes.get_errno(), "getpeereid failed")
    raw = sock.getsockopt(_SOL_LOCAL, _LOCAL_PEERPID, _PID_SIZE)
    (pid,) = struct.unpack("i", raw)
    return PeerCredentials(pid, uid.value, gid.value)


def is_allowed(
    peer: PeerCredentials, allowed_uids: Collection[int], allowed_gids: Collection[int] = ()
) -> bool:
    """Whether the allow list admits ``peer`` (by uid, or by primary gid)."""
    return peer.uid in allowed_uids or peer.gid in allowed_gids
