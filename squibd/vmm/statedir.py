"""The VM-process settings of ``[server]`` (issue 11), as ``ApiContext`` takes them.

VM processes keep their re-attach sockets (``vms/*.sock``) and the daemon its
records (``vms/*.json``) in the daemon's one private state directory
(``[server] state_dir``, created 0700 at start by ``squibd.snapshot.statedir``).
"""

from __future__ import annotations

import os
from typing import Any

from ..config import ServerConfig

__all__ = ["vm_log_path", "vm_process_settings"]


def vm_log_path(socket_path: str) -> str:
    """The log of the VM process whose re-attach socket is ``socket_path`` (``vms/<key>.log``).

    A VM process that outlives its daemon writes its stderr there, not to the daemon's.
    """
    return os.path.splitext(socket_path)[0] + ".log"


def vm_process_settings(server: ServerConfig) -> dict[str, Any]:
    """``ApiContext`` keyword arguments of the VM-process settings of ``[server]``.

    The state directory itself (``server.state_dir``, created 0700 at start by
    ``snapshot.statedir``) is passed separately: it is the daemon's one state dir.
    """
    if server.vm_isolation != "process":
        return {"vm_isolation": server.vm_isolation}
    return {
        "vm_isolation": "process",
        # on_shutdown "stop" and "save" end the VMs with the daemon; only "keep"
        # (the default) leaves VM processes to the next daemon, unless told otherwise.
        "stop_vms_on_exit": server.stop_vms_on_exit or server.on_shutdown != "keep",
        "vm_confine": {"user": server.vm_user, "seccomp": server.vm_seccomp},
    }
