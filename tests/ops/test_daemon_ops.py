"""The daemon as operators run it: metrics scrape, journald/JSON logs, on_shutdown save/restore.

Every test here runs squibd as a real process and talks to it over its socket.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from squibd.cli._logging import JournalFormatter, JsonFormatter
from squibd.client import Client, SquibdError
from tests.server.helpers import daemon_command


@contextmanager
def daemon(directory: str, *args: str, env: dict[str, str] | None = None,
           name: str = "d") -> Iterator[tuple[subprocess.Popen[bytes], str, str]]:  # fmt: skip
    """squibd on ``directory/<name>.sock`` with stderr in ``<name>.log``; SIGTERM on exit."""
    path = os.path.join(directory, f"{name}.sock")
    log_path = os.path.join(directory, f"{name}.log")
    notify_path = os.path.join(directory, f"{name}.notify")
    environ = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, \
            open(log_path, "wb") as log:  # fmt: skip
        notify.bind(notify_path)
        notify.settimeout(120)  # a hang guard for a daemon that never gets ready
        proc = subprocess.Popen(
            daemon_command("--socket", path, *args), stderr=log,
            env={**environ, "NOTIFY_SOCKET": notify_path, **(env or {})},
        )  # fmt: skip
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
            yield proc, path, log_path
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
    os.unlink(notify_path)


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def _progress_past(client: Client, vm_id: str, floor: list[int]) -> list[int]:
    deadline = time.monotonic() + 60  # a hang guard, not a timing assertion
    while time.monotonic() < deadline:
        progress: list[int] = client.vm_describe(vm_id)["guest_progress"]
        if all(p > f for p, f in zip(progress, floor, strict=True)):
            return progress
    raise AssertionError(f"VM {vm_id} made no progress past {floor}")


@pytest.mark.kvm
def test_metrics_are_scraped_over_http_and_logs_are_json(sockdir: str) -> None:
    with daemon(sockdir, "--metrics-address", "127.0.0.1:0", "--log-format", "json") as (
        proc, path, log_path,
    ):  # fmt: skip
        with open(log_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        announce = next(r for r in records if r["message"].startswith("metrics on http://"))
        url = re.search(r"http://\S+", announce["message"]).group(0)  # type: ignore[union-attr]
        assert {r["level"] for r in records} <= {"debug", "info", "warning", "error"}
        assert all(r["priority"] == 6 for r in records if r["level"] == "info")

        with Client(path) as client:
            client.daemon_status()
            with pytest.raises(SquibdError):
                client.vm_describe("ghost")
            client.vm_create("m", mem_size_mib=32)
            client.vm_start("m")
            created = client.snapshot_create("m", f"{sockdir}/m.snap", f"{sockdir}/m.mem")
            loaded = client.snapshot_load("back", f"{sockdir}/m.snap",
                                          mem_file_path=f"{sockdir}/m.mem")  # fmt: skip
            samples = _scrape(url)
        assert samples['squibd_requests_total{method="daemon.status",outcome="ok"}'] == 1
        assert samples['squibd_requests_total{method="vm.describe",outcome="UnknownVm"}'] == 1
        assert samples['squibd_request_duration_seconds_count{method="vm.start"}'] == 1
        assert samples['squibd_snapshot_bytes_total{operation="create"}'] == (
            created["bytes_written"]
        )
        assert samples['squibd_snapshot_duration_seconds_count{operation="create"}'] == 1
        assert loaded["bytes_restored"] == 32 * 1024 * 1024
        assert samples['squibd_snapshot_bytes_total{operation="load"}'] == 32 * 1024 * 1024
        assert samples['squibd_snapshot_duration_seconds_count{operation="load"}'] == 1
        assert samples["squibd_pause_seconds_count"] == 1
        assert samples['squibd_vms{state="Running"}'] == 1
        assert samples['squibd_vms{state="Paused"}'] == 1  # the loaded VM
        assert samples["squibd_connections"] == 1  # this client's, still open
    assert proc.returncode == 0


def test_journald_lines_carry_their_priority(sockdir: str) -> None:
    with daemon(sockdir, env={"JOURNAL_STREAM": "8:12345"}) as (_proc, _path, log_path):
        pass
    with open(log_path) as f:
        lines = [line for line in f.read().splitlines() if line]
    assert lines and all(re.match(r"<[0-7]>", line) for line in lines)
    assert any(line.startswith("<6>INFO squibd.server: squibd listening") for line in lines)


def test_formatters_map_levels_to_syslog_priorities() -> None:
    def record(level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord("squibd.x", level, __file__, 1, message, None, None)

    journal = JournalFormatter()
    assert journal.format(record(logging.ERROR, "a\nb")) == "<3>ERROR squibd.x: a\n<3>b"
    assert journal.format(record(logging.WARNING, "w")).startswith("<4>")
    assert journal.format(record(logging.DEBUG, "d")).startswith("<7>")
    data = json.loads(JsonFormatter().format(record(logging.ERROR, "boom")))
    assert (data["level"], data["priority"], data["message"]) == ("error", 3, "boom")
    assert JsonFormatter(journal=True).format(record(logging.INFO, "i")).startswith("<6>{")


@pytest.mark.kvm
def test_on_shutdown_save_then_restore_at_next_start(sockdir: str) -> None:
    state = os.path.join(sockdir, "state")
    saved = os.path.join(state, "shutdown")
    with daemon(sockdir, "--on-shutdown", "save", "--state-dir", state, name="a") as (
        first, path, log_path,
    ):  # fmt: skip
        with Client(path) as client:
            client.vm_create("run", vcpu_count=2, mem_size_mib=32, track_dirty_pages=True)
            client.vm_start("run")
            client.vm_create("held", mem_size_mib=32)
            client.vm_start("held")
            _progress_past(client, "held", [0])
            held = client.vm_pause("held")["guest_progress"]
            client.vm_create("fresh", mem_size_mib=32)
            run_before = _progress_past(client, "run", [0, 0])
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 0
    assert sorted(os.listdir(saved)) == ["held.mem", "held.snap", "run.mem", "run.snap"]
    with open(log_path) as f:
        log = f.read()
    assert "VM fresh was never started; not saved" in log
    assert "2 of 3 VM(s) saved" in log

    with daemon(sockdir, "--state-dir", state, name="b") as (_second, path, _log):
        with Client(path) as client:
            run = client.vm_describe("run")
            assert run["state"] == "Running"
            assert run["restored_from"] == f"{saved}/run.snap"
            assert run["track_dirty_pages"] is True
            _progress_past(client, "run", run_before)  # the guest carries on
            back = client.vm_describe("held")
            assert back["state"] == "Paused" and back["guest_progress"] == held
            assert back["restored_from"] == f"{saved}/held.snap"
            with pytest.raises(SquibdError) as gone:
                client.vm_describe("fresh")
            assert gone.value.kind == "UnknownVm"
            assert client.vm_list()["vms"][0]["vm_id"] == "held"
        assert os.listdir(saved) == []  # restored pairs are consumed


@pytest.mark.kvm
def test_on_shutdown_stop_saves_nothing(sockdir: str) -> None:
    state = os.path.join(sockdir, "state")
    with daemon(sockdir, "--on-shutdown", "stop", "--state-dir", state) as (proc, path, _):
        with Client(path) as client:
            client.vm_create("x", mem_size_mib=32)
            client.vm_start("x")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert not os.path.exists(os.path.join(state, "shutdown"))


@pytest.mark.kvm
def test_a_vm_whose_shutdown_save_fails_is_named_and_the_others_are_saved(sockdir: str) -> None:
    state = os.path.join(sockdir, "state")
    saved = os.path.join(state, "shutdown")
    os.makedirs(os.path.join(saved, "bad.snap"))  # a directory where bad's state file would go
    with daemon(sockdir, "--on-shutdown", "save", "--state-dir", state) as (proc, path, log):
        with Client(path) as client:
            for vm_id in ("bad", "good"):
                client.vm_create(vm_id, mem_size_mib=32)
                client.vm_start(vm_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    with open(log) as f:
        text = f.read()
    assert re.search(r"ERROR squibd.lifecycle: on_shutdown=save: VM bad NOT saved", text)
    assert "1 of 2 VM(s) saved" in text
    assert {"good.mem", "good.snap"} <= set(os.listdir(saved))
    assert os.path.isdir(os.path.join(saved, "bad.snap"))  # nothing half-written over it
    assert not any(name.startswith(".good.") for name in os.listdir(saved))  # no temps
