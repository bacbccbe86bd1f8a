"""VM processes as the default (issue 11): what an operator sees of them.

A daemon started with no isolation option runs each VM in its own process,
named ``squibd-vm``, detached from the daemon's stdio (a VM process that
outlives the daemon must not hold the pipes of whoever started it) and
logging beside its re-attach socket. One daemon at a time uses a state dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from squibd.snapshot.statedir import STATE_DIR_ENV, default_state_dir
from squibd.vmm.untraced import spawn_untraced
from squibd.vmm.zygote import VM_PROCESS_NAME
from tests.server.helpers import blocking_call, daemon_command, start_daemon
from tests.vmm._procfs import proc_status

#: Bound on waiting for a daemon on a loaded host.
WAIT_S = 60.0


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm", encoding="utf-8") as f:
        return f.read().strip()


def _call(path: str, method: str, params: object = None) -> dict[str, object]:
    reply = blocking_call(path, method, params, timeout=WAIT_S)
    assert "error" not in reply, reply
    result: dict[str, object] = reply["result"]
    return result


def _started(tmp_path: Path, command: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Run ``command`` (a daemon, maybe under a tracer) until it sends READY=1."""
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(WAIT_S)
        proc = subprocess.Popen(command, env={**os.environ, "NOTIFY_SOCKET": notify_path},
                                **popen)  # fmt: skip
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
    return proc


def _run_counter(sock: str) -> int:
    """Create and start VM ``v`` (a counter guest); its VM process's pid."""
    _call(sock, "vm.create", {"vm_id": "v", "vcpu_count": 1, "mem_size_mib": 16,
                              "guest": {"program": "counter"}})  # fmt: skip
    return int(str(_call(sock, "vm.start", {"vm_id": "v"})["process_id"]))


def _end(proc: subprocess.Popen[bytes], vm_pid: int) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    if vm_pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(vm_pid, signal.SIGKILL)


def test_the_state_dir_env_names_the_default_and_a_relative_one_is_ignored() -> None:
    assert default_state_dir({STATE_DIR_ENV: "/srv/sq"}, euid=0) == "/srv/sq"
    assert default_state_dir({STATE_DIR_ENV: "/srv/sq"}, euid=1000) == "/srv/sq"
    assert default_state_dir({STATE_DIR_ENV: "rel/sq"}, euid=0) == "/var/lib/squibd/state"


def test_a_second_daemon_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first, _path = start_daemon(str(tmp_path), "--state-dir", str(state))
    try:
        second = subprocess.run(
            daemon_command("--socket", str(tmp_path / "other.sock"), "--state-dir", str(state)),
            capture_output=True, timeout=WAIT_S, check=False, text=True,
        )  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert f"state directory {state} is in use by another squibd (pid {first.pid})" in (
            second.stderr
        )
        assert not (tmp_path / "other.sock").exists()
    finally:
        first.terminate()
        assert first.wait(WAIT_S) == 0
    # Once the first is gone, the state dir is free again.
    (tmp_path / "again").mkdir()
    again, _path = start_daemon(str(tmp_path / "again"), "--state-dir", str(state))
    again.terminate()
    assert again.wait(WAIT_S) == 0


@pytest.mark.kvm
def test_by_default_a_vm_runs_in_a_named_process_detached_from_the_daemons_stdio(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    sock = str(tmp_path / "s.sock")
    proc = _started(tmp_path, daemon_command("--socket", sock, "--state-dir", str(state)),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    pid = 0
    try:
        pid = _run_counter(sock)
        assert pid != proc.pid and _comm(pid) == VM_PROCESS_NAME
        logs = list((state / "vms").glob("*.log"))
        assert len(logs) == 1
        # SIGTERM with on_shutdown = "keep" (the default): the VM process runs on, and the
        # daemon's pipes reach end of file all the same (communicate would hang otherwise).
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, err
        assert _comm(pid) == VM_PROCESS_NAME
    finally:
        _end(proc, pid)


STRACE = shutil.which("strace")


@pytest.mark.kvm
@pytest.mark.skipif(STRACE is None, reason="needs strace")
def test_a_tracer_following_the_daemon_neither_traces_nor_waits_for_its_vm_processes(
    tmp_path: Path,
) -> None:
    assert STRACE is not None
    sock = str(tmp_path / "s.sock")
    command = [STRACE, "-f", "-qq", "-o", "/dev/null",
               *daemon_command("--socket", sock, "--state-dir", str(tmp_path / "state"))]
    tracer = _started(tmp_path, command, stderr=subprocess.DEVNULL)
    pid = 0
    try:
        daemon_pid = int(str(_call(sock, "daemon.status")["pid"]))
        pid = _run_counter(sock)
        assert proc_status(daemon_pid)["TracerPid"] == str(tracer.pid)
        assert proc_status(pid)["TracerPid"] == "0"  # the zygote was cloned untraced
        os.kill(daemon_pid, signal.SIGKILL)
        assert tracer.wait(WAIT_S) == -signal.SIGKILL  # strace ends with its tracee
        assert _comm(pid) == VM_PROCESS_NAME  # and the VM runs on
    finally:
        _end(tracer, pid)


def test_the_raw_clone_is_used_only_while_the_process_has_one_thread() -> None:
    """With another thread, a raw clone's child could hang before its exec (module doc)."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    ours, theirs = socket.socketpair()
    try:
        child = spawn_untraced(["/bin/true"], theirs.fileno())
        assert child._popen is not None  # the fallback: subprocess.Popen
        assert child.wait(WAIT_S) == 0
    finally:
        stop.set()
        other.join()
        ours.close()
        theirs.close()
