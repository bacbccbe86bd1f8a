"""The daemon's state directory as VM processes use it (issue 11), from ``[server]``.

A minimal resolver until the paths work of the hardening issue lands: the
configured ``state_dir``, else ``$XDG_RUNTIME_DIR/squibd/state`` for a
user daemon, else ``/run/squibd/state``. It is created private (0700). VM
processes keep their re-attach sockets there (``vms/*.sock``) and the daemon
their records (``vms/*.json``).
"""

from __future__ import annotations

import os
from typing import Any, Final

from ..config import ServerConfig

__all__ = ["SYSTEM_STATE_DIR", "resolve_state_dir", "vm_process_settings"]

SYSTEM_STATE_DIR: Final = "/run/squibd/state"


def resolve_state_dir(configured: str | None, environ: dict[str, str] | None = None) -> str:
    """The state directory, created with mode 0700 if missing."""
    env = os.environ if environ is None else environ
    if configured:
        path = configured
    elif env.get("XDG_RUNTIME_DIR") and os.getuid() != 0:
        path = os.path.join(env["XDG_RUNTIME_DIR"], "squibd", "state")
    else:
        path = SYSTEM_STATE_DIR
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


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
