"""``make demo``: squibd end to end in under a minute.

1. starts ``squibd`` on a temporary socket (and waits for its sd_notify READY=1);
2. creates a 2-vCPU ``counter`` VM with dirty page tracking and runs it;
3. takes a Full snapshot, lets the guest run, pauses it, takes a Diff
   snapshot (through ``squibctl``, with progress bars);
4. destroys the VM;
5. restores: rebases the Diff onto the Full, loads the merged pair;
6. shows the counters starting exactly at their saved values and going on;
7. restarts the daemon: the VM runs in its own VM process, which outlives
   the daemon; the new daemon re-attaches it and the counters went on;
8. destroys the VM, prints the timings and stops the daemon (SIGTERM, exit 0).

Its daemons keep their state (journals, VM-process records) in the demo's
temporary directory, not in the host's state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Final

__all__ = ["main"]

_PY: Final = sys.executable
_SQUIBD: Final = [_PY, "-m", "squibd.cli.daemon"]
_SQUIBCTL: Final = [_PY, "-m", "squibd.cli.ctl"]
_VM: Final = "demo"
_VCPUS: Final = 2
_MEM_MIB: Final = 256
#: How long the demo lets the guest run between steps (it is a demo, not a test).
_RUN_S: Final = 0.5
_READY_TIMEOUT_S: Final = 30.0
_CONTINUE_TIMEOUT_S: Final = 20.0
_STOP_TIMEOUT_S: Final = 30.0
_DATAGRAM: Final = 4096
_KVM: Final = "/dev/kvm"


class DemoFailed(Exception):
    """A step of the demo did not do what it should."""


def _say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def _ctl(sock: str, *args: str, progress: bool = False) -> Any:
    """Run ``squibctl --json ARGS``; print the command; return the parsed result."""
    shown = " ".join(["squibctl", *args, *(["--progress"] if progress else [])])
    print(f"$ {shown}", flush=True)
    extra = ["--progress"] if progress else []
    done = subprocess.run(
        [*_SQUIBCTL, "--socket", sock, "--json", *args, *extra],
        stdout=subprocess.PIPE, stderr=None if progress else subprocess.PIPE, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        detail = (done.stderr or b"").decode().strip()
        raise DemoFailed(f"squibctl {' '.join(args)} failed ({done.returncode}): {detail}")
    return json.loads(done.stdout)


def _counters(info: dict[str, Any]) -> str:
    return ", ".join(f"vCPU{i}={value:,}" for i, value in enumerate(info["guest_progress"]))


def _wait_past(sock: str, floor: list[int]) -> dict[str, Any]:
    """Describe the VM until every counter is past ``floor`` (a busy host may be slow)."""
    deadline = time.monotonic() + _CONTINUE_TIMEOUT_S
    while True:
        info: dict[str, Any] = _ctl(sock, "vm", "describe", _VM)
        if all(now > then for now, then in zip(info["guest_progress"], floor, strict=True)):
            return info
        if time.monotonic() > deadline:
            raise DemoFailed("the counters did not continue past their saved values")
        time.sleep(_RUN_S)


def _start_daemon(workdir: str) -> tuple[subprocess.Popen[bytes], str]:
    sock = os.path.join(workdir, "squibd.sock")
    notify_path = os.path.join(workdir, "notify")
    args = ["--socket", sock, "--state-dir", os.path.join(workdir, "state"),
            "--log-level", "warning"]  # fmt: skip
    with contextlib.suppress(FileNotFoundError):
        os.unlink(notify_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(_READY_TIMEOUT_S)
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        print(f"$ squibd {' '.join(args)}", flush=True)
        proc = subprocess.Popen([*_SQUIBD, *args], env=env)
        try:
            while b"READY=1" not in notify.recv(_DATAGRAM).split(b"\n"):
                pass
        except TimeoutError:
            proc.kill()
            raise DemoFailed("squibd did not report READY=1") from None
    return proc, sock


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    print(f"$ kill -TERM {proc.pid}", flush=True)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=_STOP_TIMEOUT_S)
    print(f"squibd exited with {code}")
    if code != 0:
        raise DemoFailed(f"squibd exited with {code}")


def _run(workdir: str) -> dict[str, float]:
    proc, sock = _start_daemon(workdir)
    timings: dict[str, float] = {}
    destroyed = False
    try:
        status = _ctl(sock, "status")
        print(f"squibd {status['version']} pid {status['pid']}, KVM available: "
              f"{status['kvm_available']}")  # fmt: skip
        _say(f"create and start a {_VCPUS}-vCPU counter VM with dirty page tracking")
        _ctl(sock, "vm", "create", _VM, "--vcpus", str(_VCPUS), "--mem-mib", str(_MEM_MIB),
             "--track-dirty-pages", "--program", "counter")  # fmt: skip
        _ctl(sock, "vm", "start", _VM)
        time.sleep(_RUN_S)
        print("running:", _counters(_ctl(sock, "vm", "describe", _VM)))

        _say("Full snapshot while it runs (the guest is paused only for the save)")
        snap = {k: os.path.join(workdir, f"{k}.snap") for k in ("full", "diff", "merged")}
        mem = {k: os.path.join(workdir, f"{k}.mem") for k in ("full", "diff", "merged")}
        full = _ctl(sock, "snapshot", "create", _VM, "--snapshot-path", snap["full"],
                    "--mem-file-path", mem["full"], progress=True)  # fmt: skip
        timings["full_save_ms"] = full["duration_ms"]
        timings["full_pause_ms"] = full["pause_ms"]
        print(f"Full: {full['pages_written']} pages in {full['duration_ms']:.1f} ms")
        time.sleep(_RUN_S)
        _wait_past(sock, _ctl(sock, "vm", "describe", _VM)["guest_progress"])

        _say("pause, then a Diff snapshot: only the pages dirtied since the Full")
        saved = _ctl(sock, "vm", "pause", _VM)
        print("saved counters:", _counters(saved))
        diff = _ctl(sock, "snapshot", "create", _VM, "--type", "Diff", "--snapshot-path",
                    snap["diff"], "--mem-file-path", mem["diff"], progress=True)  # fmt: skip
        timings["diff_save_ms"] = diff["duration_ms"]
        print(f"Diff: {diff['pages_written']} pages in {diff['duration_ms']:.1f} ms")

        _say("destroy the VM")
        _ctl(sock, "vm", "destroy", _VM)
        print(f"VMs left: {len(_ctl(sock, 'vm', 'list')['vms'])}")

        _say("restore: rebase the Diff onto the Full, load the merged pair")
        rebase = _ctl(sock, "snapshot", "rebase", "--base", snap["full"], "--diff", snap["diff"],
                      "--output", snap["merged"], progress=True)  # fmt: skip
        timings["rebase_ms"] = rebase["duration_ms"]
        loaded = _ctl(sock, "snapshot", "load", _VM, "--snapshot-path", snap["merged"],
                      "--mem-file-path", mem["merged"], progress=True)  # fmt: skip
        timings["load_ms"] = loaded["duration_ms"]
        print("restored counters:", _counters(loaded["vm"]))
        if loaded["vm"]["guest_progress"] != saved["guest_progress"]:
            raise DemoFailed("the restored counters differ from the saved ones")

        _say("resume: the guest continues from where it was saved")
        _ctl(sock, "vm", "resume", _VM)
        time.sleep(_RUN_S)
        after = _wait_past(sock, saved["guest_progress"])
        print("counters now:  ", _counters(after))
        print("every counter continued past its saved value")

        _say("restart the daemon: the VM keeps running in its VM process, the new daemon "
             "re-attaches it")  # fmt: skip
        _stop_daemon(proc)
        proc, sock = _start_daemon(workdir)
        described = _ctl(sock, "vm", "describe", _VM)
        print(f"re-attached: VM process {described['process_id']}, {described['state']}, "
              f"counters {_counters(described)}")  # fmt: skip
        _wait_past(sock, after["guest_progress"])
        print("the counters went on across the restart")
        _say("destroy the VM")
        _ctl(sock, "vm", "destroy", _VM)
        destroyed = True
    finally:
        if proc.poll() is None:
            if not destroyed:  # a failed step left it: it would outlive the daemon
                with contextlib.suppress(DemoFailed):
                    _ctl(sock, "vm", "destroy", _VM)
            _say("stop the daemon (SIGTERM)")
            _stop_daemon(proc)
    return timings


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns 0 on success."""
    if not os.access(_KVM, os.R_OK | os.W_OK):
        print(f"squibd demo: {_KVM} is not available here; the demo needs KVM", file=sys.stderr)
        return 1
    started = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="squibd-demo-", dir="/tmp")
    try:
        timings = _run(workdir)
    except DemoFailed as exc:
        print(f"\nsquibd demo FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    _say("timings")
    for name, value in timings.items():
        print(f"  {name:<14} {value:9.1f}")
    print(f"  {'demo_total_s':<14} {time.monotonic() - started:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
