"""The zygote: a pre-imported process that forks one VM process per VM.

A fresh Python interpreter with squibd's KVM code imported takes far longer
than ``snapshot.load`` may (issue 11: 20 ms at 1 GiB), so the daemon keeps
one warm zygote. It reads ``spawn`` requests (each carrying one end of a
fresh socketpair) from its control socket, forks, and answers the child's
pid. The child starts its own process group (it is not killed with the
daemon's) and serves its VM on that socket (``process.serve_fd``).

The zygote is the VM processes' parent, so it alone learns how they end:
it reaps them on SIGCHLD and reports ``{"event": "exited", "pid", "status"}``
(the raw wait status) to the daemon. It exits when the daemon closes the
control socket; its VM processes carry on (re-parented to init).

Both are named for ``ps -C`` and ``pgrep -x`` (``/proc/PID/comm``): the zygote
``squibd-zygote``, each VM process ``squibd-vm``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import select
import signal
import socket
import sys
from typing import Final

from .channel import Channel, ChannelClosed
from .process import serve_fd
from .protocol import error_reply, ok_reply

__all__ = ["VM_PROCESS_NAME", "ZYGOTE_NAME", "main", "set_process_name"]

#: ``/proc/PID/comm`` of the zygote and of each VM process.
ZYGOTE_NAME: Final = "squibd-zygote"
VM_PROCESS_NAME: Final = "squibd-vm"
_PR_SET_NAME: Final = 15


def set_process_name(name: str) -> None:
    """Name the calling process (its main thread) as ``ps`` shows it (best effort)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)



def _detach_stdio() -> None:
    """Point stdin and stdout at /dev/null: a VM process may outlive whoever reads the daemon's.

    Its stderr goes to its own log once it has a state dir (``process.py``).
    """
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def _reap(channel: Channel) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        with contextlib.suppress(ChannelClosed):
            channel.send({"event": "exited", "pid": pid, "status": status})


def _answer(channel: Channel, message: dict[str, object]) -> bool:
    """Send ``message``; False when the daemon has gone away meanwhile."""
    try:
        channel.send(message)
    except ChannelClosed:
        return False
    return True


def run(fd: int) -> int:
    """Serve spawn requests on control socket ``fd`` until it closes."""
    channel = Channel(socket.socket(fileno=fd))
    set_process_name(ZYGOTE_NAME)
    # Everything imported lives as long as the zygote and its VM processes:
    # frozen, the collector never walks it, so a forked child does not
    # copy-on-write the whole inherited heap at its first collection.
    gc.collect()
    gc.freeze()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    while True:
        sock_fd = channel.sock.fileno()
        readable, _, _ = select.select([sock_fd, wake_r], [], [])
        if wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                os.read(wake_r, 4096)
            _reap(channel)
        if sock_fd not in readable:
            continue
        try:
            message, fds = channel.receive()
        except ChannelClosed:
            return 0
        request_id = int(message.get("id", 0))
        if message.get("op") != "spawn" or len(fds) != 1:
            for extra in fds:
                os.close(extra)
            if not _answer(channel, error_reply(request_id, "Protocol",
                                                "expected spawn with one fd")):
                return 0
            continue
        pid = os.fork()
        if pid == 0:  # the VM process
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                channel.sock.close()
                # Its own process group: signals to the daemon's group (a
                # terminal's ^C, systemd's KillMode=mixed/control-group) skip
                # it. Not its own session: with sched_autogroup a new session
                # is a new scheduling group, which measured 5x slower
                # quiesce wake-ups on a loaded host (bench/vm_process.py).
                os.setpgid(0, 0)
                set_process_name(VM_PROCESS_NAME)
                _detach_stdio()
                code = serve_fd(fds[0])
            finally:
                os._exit(code)
        os.close(fds[0])
        if not _answer(channel, ok_reply(request_id, {"pid": pid})):
            return 0  # the daemon is gone: so is the zygote (the child sees EOF and exits)


def main(argv: list[str] | None = None) -> int:
    """``python -m squibd.vmm.zygote --fd N``."""
    args = sys.argv[1:] if argv is None else argv
    return run(int(args[args.index("--fd") + 1]))


if __name__ == "__main__":
    sys.exit(main())
