"""squibd as a service: SIGTERM, sd_notify, socket activation, unit files, plist."""

from __future__ import annotations

import os
import plistlib
import shutil
import signal
import socket
import subprocess

import pytest

from squibd.server import Notifier

from .helpers import REPO, blocking_call, daemon_command, wait_for_socket

_DATAGRAM_MAX = 4096


def _notify_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(60)  # a hang guard for a daemon that never notifies
    return sock


def _read_until(sock: socket.socket, field: str) -> str:
    while True:
        message = sock.recv(_DATAGRAM_MAX).decode()
        if field in message.split("\n"):
            return message


def test_sigterm_stops_gracefully_with_sd_notify(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    notify = _notify_socket(f"{sockdir}/notify")
    env = {**os.environ, "NOTIFY_SOCKET": f"{sockdir}/notify"}
    proc = subprocess.Popen(daemon_command("--socket", path), env=env, stderr=subprocess.PIPE)
    try:
        ready = _read_until(notify, "READY=1")
        assert "STATUS=accepting connections" in ready
        assert blocking_call(path, "daemon.status")["result"]["pid"] == proc.pid
        assert blocking_call(path, "vm.destroy", {"vm_id": "nope"})["error"]["code"] == -32002
        proc.send_signal(signal.SIGTERM)
        _read_until(notify, "STOPPING=1")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert not os.path.exists(path)
    assert proc.stderr is not None
    log = proc.stderr.read().decode()
    # One line per request: INFO for vm.destroy, DEBUG (not shown at the default
    # level) for the cheap read-only daemon.status (issue 10: no log flood).
    assert "method=vm.destroy" in log and "outcome=error -32002 UnknownVm" in log
    assert "method=daemon.status" not in log


def test_second_daemon_on_same_socket_refuses_to_start(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    first = subprocess.Popen(daemon_command("--socket", path), stderr=subprocess.PIPE)
    try:
        wait_for_socket(first, path)
        second = subprocess.run(daemon_command("--socket", path), capture_output=True, timeout=60)
        assert second.returncode == 1
        assert b"already listening" in second.stderr
        assert blocking_call(path, "daemon.status")["result"]["pid"] == first.pid
    finally:
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=60) == 0


def test_watchdog_pings_when_configured(sockdir: str) -> None:
    notify = _notify_socket(f"{sockdir}/notify")
    env = {**os.environ, "NOTIFY_SOCKET": f"{sockdir}/notify", "WATCHDOG_USEC": "100000"}
    proc = subprocess.Popen(
        daemon_command("--socket", f"{sockdir}/s.sock"), env=env, stderr=subprocess.DEVNULL
    )
    try:
        _read_until(notify, "WATCHDOG=1")
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        notify.close()


def test_notifier_sends_to_abstract_socket() -> None:
    name = f"squibd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier(address="@" + name)
        assert notifier.notify(READY="1", STATUS="hi")
        assert sock.recv(_DATAGRAM_MAX) == b"READY=1\nSTATUS=hi"
    assert not Notifier().notify(READY="1")


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate is not installed")  # fmt: skip
def test_socket_activation_with_systemd_socket_activate(sockdir: str) -> None:
    path = f"{sockdir}/act.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", path, *daemon_command()],
        stderr=subprocess.PIPE,
    )
    try:
        # systemd-socket-activate binds first; wait for it by its log line.
        assert proc.stderr is not None
        for raw in proc.stderr:
            if b"Listening on" in raw:
                break
        answer = blocking_call(path, "daemon.status", timeout=60)
        assert answer["result"]["pid"] == proc.pid  # it exec()s squibd in place
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify(sockdir: str) -> None:
    for name in ("squibd.socket", "squibd.service"):
        with open(os.path.join(REPO, "systemd", name)) as f:
            text = f.read()
        # verify checks that ExecStart exists: point it at this checkout's entry point.
        text = text.replace("/usr/local/bin/squibd", os.path.join(REPO, ".venv", "bin", "squibd"))
        with open(os.path.join(sockdir, name), "w") as f:
            f.write(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"{sockdir}/squibd.socket", f"{sockdir}/squibd.service"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "squibd" not in result.stderr, result.stderr
    with open(os.path.join(REPO, "systemd", "squibd.service")) as f:
        service = f.read()
    assert "Type=notify" in service
    assert "DeviceAllow=/dev/kvm rw" in service and "DeviceAllow=/dev/userfaultfd rw" in service


def test_launchd_plist_is_valid() -> None:
    with open(os.path.join(REPO, "launchd", "com.squib.squibd.plist"), "rb") as f:
        plist = plistlib.load(f)
    assert plist["Label"] == "com.squib.squibd"
    listener = plist["Sockets"]["Listeners"]
    assert listener["SockPathName"].endswith("squibd.sock")
    assert listener["SockPathMode"] == 0o600
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] is True
    assert plist["StandardErrorPath"] and plist["StandardOutPath"]
    assert plist["ProgramArguments"][0].endswith("squibd")
