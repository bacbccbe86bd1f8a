"""squibctl and squibd command lines: output, exit codes, socket selection."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

from tests.server.helpers import running_server

CTL = [sys.executable, "-m", "squibd.cli.ctl"]
DAEMON = [sys.executable, "-m", "squibd.cli.daemon"]


async def _ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*CTL, *args], capture_stdout=True, capture_stderr=True, check=False,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


async def test_status_human_and_json(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        human = await _ctl("--socket", path, "status")
        as_json = await _ctl("--json", "status", env={"SQUIBD_SOCKET": path})
    assert human.returncode == 0, human.stderr
    assert human.stdout.decode().startswith(f"squibd 0.1.0 (pid {os.getpid()})")
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["pid"] == os.getpid()


async def test_error_exits_1_with_fault_message_on_stderr(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        result = await _ctl("--socket", path, "vm", "describe", "ghost")
        raw = await _ctl("--socket", path, "--json", "call", "vm.describe", '{"vm_id": "ghost"}')
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.decode().startswith("squibctl: UnknownVm: VM 'ghost' does not exist")
    assert raw.returncode == 1
    assert json.loads(raw.stderr)["error"]["code"] == -32002


async def test_call_with_bad_json_is_a_usage_error(sockdir: str) -> None:
    result = await _ctl("--socket", f"{sockdir}/none.sock", "call", "daemon.status", "[1,")
    assert result.returncode == 2


async def test_unreachable_daemon_exits_1(sockdir: str) -> None:
    result = await _ctl("--socket", f"{sockdir}/none.sock", "status")
    assert result.returncode == 1
    assert b"cannot connect to squibd" in result.stderr


@pytest.mark.parametrize(
    ("command", "code"),
    [
        ([*CTL, "--help"], 0),
        ([*CTL, "vm", "explode"], 2),
        ([*CTL], 2),
        ([*CTL, "vm", "create"], 2),
        ([*DAEMON, "--help"], 0),
        ([*DAEMON, "--no-such-flag"], 2),
    ],
)
def test_help_and_usage_exit_codes(command: list[str], code: int) -> None:
    assert subprocess.run(command, capture_output=True, timeout=60).returncode == code


def test_daemon_rejects_a_bad_config_with_exit_2(sockdir: str) -> None:
    config = f"{sockdir}/bad.toml"
    with open(config, "w") as f:
        f.write("[server]\nmax_connections = 0\n")
    result = subprocess.run([*DAEMON, "--config", config, "--socket", f"{sockdir}/s.sock"],
                            capture_output=True, timeout=60)  # fmt: skip
    assert result.returncode == 2
    assert b"max_connections must be positive" in result.stderr


def test_offline_modes_are_dispatched(sockdir: str) -> None:
    result = subprocess.run([*DAEMON, "--describe-snapshot", f"{sockdir}/missing.snap"],
                            capture_output=True, timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert b"missing.snap" in result.stdout + result.stderr


@pytest.mark.kvm
async def test_snapshot_create_shows_progress_and_human_result(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        for args in (["vm", "create", "p", "--vcpus", "1", "--mem-mib", "64"],
                     ["vm", "start", "p"]):  # fmt: skip
            assert (await _ctl("--socket", path, *args)).returncode == 0
        result = await _ctl("--socket", path, "snapshot", "create", "p", "--progress",
                            "--snapshot-path", f"{sockdir}/p.snap",
                            "--mem-file-path", f"{sockdir}/p.mem")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "snapshot.create" in result.stderr.decode()  # the progress bar's label
    assert result.stdout.decode().startswith(f"Full snapshot {sockdir}/p.snap")


@pytest.mark.kvm
async def test_ctrl_c_during_save_sends_cancel_and_the_save_rolls_back(sockdir: str) -> None:
    import signal

    from squibd.cli.ctl import _run_call
    from squibd.client import AsyncClient, SquibdError
    from tests.api.test_methods_kvm import FILL_SIZE, _create, _fill

    path = f"{sockdir}/s.sock"
    params = {"vm_id": "c", "snapshot_path": f"{sockdir}/c.snap",
              "mem_file_path": f"{sockdir}/c.mem"}  # fmt: skip
    interrupted: list[bool] = []

    def progress(phase: str, done: int, total: int) -> None:
        if not interrupted:  # the user presses Ctrl-C once the save is under way
            interrupted.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    async with running_server(path) as server, AsyncClient(path) as client:
        await _create(client, "c", mib=FILL_SIZE // (1024 * 1024) + 128)
        await client.call("vm.start", {"vm_id": "c"})
        await trio.to_thread.run_sync(_fill, server, "c")
        with pytest.raises(SquibdError) as info:
            await _run_call(client, "snapshot.create", params, progress)
    assert interrupted
    assert info.value.code == -32800
    assert sorted(os.listdir(sockdir)) == []  # nothing committed, no temp files
