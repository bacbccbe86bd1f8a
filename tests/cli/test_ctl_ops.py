"""squibctl for operators: versions, help defaults, --json anywhere, relative paths, exit codes,
hints, the rebase chain, list/delete tables, completion, the progress tally."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import trio

from squibd.cli._progress import Tally
from tests.server.helpers import running_server

CTL = [sys.executable, "-m", "squibd.cli.ctl"]
DAEMON = [sys.executable, "-m", "squibd.cli.daemon"]


async def _ctl(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process([*CTL, *args], capture_stdout=True, capture_stderr=True,
                                  check=False, cwd=cwd)  # fmt: skip


@pytest.mark.parametrize(("command", "name"), [(CTL, "squibctl"), (DAEMON, "squibd")])
def test_version_prints_and_exits_0(command: list[str], name: str) -> None:
    import squibd

    result = subprocess.run([*command, "--version"], capture_output=True, timeout=60)
    assert result.returncode == 0
    assert result.stdout.decode().strip() == f"{name} {squibd.__version__}"


def test_help_shows_defaults() -> None:
    out = subprocess.run([*CTL, "vm", "create", "--help"], capture_output=True, timeout=60)
    assert out.returncode == 0
    assert "(default: 128)" in out.stdout.decode()
    assert "(default: counter)" in out.stdout.decode()
    daemon = subprocess.run([*DAEMON, "--help"], capture_output=True, timeout=60).stdout.decode()
    assert "default:" in daemon and "--metrics-address" in daemon


async def test_json_anywhere_and_relative_paths_are_resolved(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        late = await _ctl("--socket", path, "status", "--json")
        rel = await _ctl("--socket", path, "snapshot", "describe", "missing.snap", "--json",
                         cwd=sockdir)  # fmt: skip
        human = await _ctl("--socket", path, "snapshot", "describe", "missing.snap", cwd=sockdir)
    assert late.returncode == 0 and json.loads(late.stdout)["pid"] == os.getpid()
    described = json.loads(rel.stdout)
    assert described["path"] == f"{sockdir}/missing.snap"  # resolved here, not by the daemon
    assert described["ok"] is False
    assert rel.returncode == 1  # not loadable: scripts see it
    assert human.returncode == 1
    assert f"{sockdir}/missing.snap: NOT loadable" in human.stdout.decode()
    assert f"state file {sockdir}/missing.snap cannot be read" in human.stdout.decode()


async def test_unreachable_daemon_names_the_socket_and_what_to_do(sockdir: str) -> None:
    result = await _ctl("--socket", f"{sockdir}/none.sock", "vm", "list")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"{sockdir}/none.sock" in err and "hint:" in err


def test_completion_scripts_for_bash_and_zsh() -> None:
    for shell in ("bash", "zsh"):
        out = subprocess.run([*CTL, "completion", shell], capture_output=True, timeout=60)
        assert out.returncode == 0
        script = out.stdout.decode()
        assert "squibctl" in script and "snapshot" in script and "--mem-file-path" in script
        if shell == "bash":
            assert subprocess.run(["bash", "-n"], input=out.stdout, timeout=60).returncode == 0


def test_live_passes_fold_into_one_forward_moving_bar() -> None:
    tally = Tally()
    seen = []
    for phase, done, total in [("pass-1", 0, 100), ("pass-1", 100, 100), ("pass-2", 0, 30),
                               ("pass-2", 30, 30), ("pass-3", 5, 5)]:  # fmt: skip
        tally.update(phase, done, total)
        seen.append((tally.completed, tally.grand_total))
    assert seen == [(0, 100), (100, 100), (100, 130), (130, 130), (135, 135)]
    assert [c for c, _ in seen] == sorted(c for c, _ in seen)
    assert tally.phases == 3


def test_load_steps_are_not_summed() -> None:
    tally = Tally()
    for index, phase in enumerate(("read-state", "check-pair", "map-memory", "restore", "done")):
        tally.update(phase, index + 1, 5)
    assert (tally.completed, tally.grand_total) == (5, 5)


@pytest.mark.kvm
async def test_diff_hint_chain_rebase_and_list_delete_tables(sockdir: str) -> None:
    from squibd.client import AsyncClient

    path = f"{sockdir}/s.sock"
    base = ["--socket", path]
    async with running_server(path), AsyncClient(path) as client:

        async def ok(*args: str) -> str:
            result = await _ctl(*base, *args, cwd=sockdir)
            assert result.returncode == 0, result.stderr
            return result.stdout.decode()

        await client.vm_create("nd", mem_size_mib=32)
        await client.vm_start("nd")
        await client.snapshot_create("nd", f"{sockdir}/nd.snap", f"{sockdir}/nd.mem")
        refused = await _ctl(*base, "snapshot", "create", "nd", "--type", "Diff",
                             "--snapshot-path", "d.snap", "--mem-file-path", "d.mem",
                             cwd=sockdir)  # fmt: skip
        assert refused.returncode == 1
        assert "--track-dirty-pages" in refused.stderr.decode()

        await client.vm_create("c", mem_size_mib=32, track_dirty_pages=True)
        await client.vm_start("c")
        await ok("snapshot", "create", "c", "--snapshot-path", "full.snap",
                 "--mem-file-path", "full.mem", "--label", "tier=gold")  # fmt: skip
        await client.snapshot_create("c", f"{sockdir}/d1.snap", f"{sockdir}/d1.mem",
                                     snapshot_type="Diff")  # fmt: skip
        await client.vm_pause("c")
        await client.snapshot_create("c", f"{sockdir}/d2.snap", f"{sockdir}/d2.mem",
                                     snapshot_type="Diff")  # fmt: skip
        progress = (await client.vm_describe("c"))["guest_progress"]
        await ok("snapshot", "rebase", "--base", "full.snap", "--diff", "d1.snap",
                 "--diff", "d2.snap", "--output", "merged.snap",
                 "--output-mem-file-path", "merged.mem")  # fmt: skip
        await client.snapshot_load("m", f"{sockdir}/merged.snap",
                                   mem_file_path=f"{sockdir}/merged.mem")  # fmt: skip
        loaded = await client.vm_describe("m")
        assert loaded["guest_progress"] == progress  # the whole chain was applied

        table = await ok("snapshot", "list", "--root", ".")
        header, *rows = table.splitlines()
        assert header.split()[:3] == ["SNAPSHOT", "TYPE", "VM"]
        assert len(rows) == 5
        gold = [r for r in rows if "tier=gold" in r]
        assert len(gold) == 1 and gold[0].startswith(f"{sockdir}/full.snap")
        deleted = await ok("snapshot", "delete", "merged.snap")
        assert deleted.strip() == f"deleted {sockdir}/merged.snap + {sockdir}/merged.mem"
        refused = await _ctl(*base, "snapshot", "delete", "full.snap", cwd=sockdir)
        assert refused.returncode == 1
        assert "--force" in refused.stderr.decode()

def test_offline_tools_accept_the_shared_spellings_and_the_old_ones(sockdir: str) -> None:
    for flag in ("--mem-file-path", "--memory-file"):
        result = subprocess.run([*DAEMON, "--describe-snapshot", f"{sockdir}/a.snap", "--json",
                                 flag, f"{sockdir}/b.mem"], capture_output=True, timeout=60)
        assert json.loads(result.stdout)["path"] == f"{sockdir}/a.snap", result.stderr
    for flag in ("--output-mem-file-path", "--output-memory-file"):
        result = subprocess.run([*DAEMON, "--rebase-snapshot", "--base", f"{sockdir}/a.snap",
                                 "--diff", f"{sockdir}/b.snap", "--diff", f"{sockdir}/c.snap",
                                 "--output", f"{sockdir}/o.snap", flag, f"{sockdir}/o.mem"],
                                capture_output=True, timeout=60)  # fmt: skip
        assert result.returncode == 1, result.stderr  # parsed; fails on the missing base
        assert b"a.snap" in result.stderr or b"Io" in result.stderr


@pytest.mark.kvm
async def test_live_save_progress_is_one_bar_with_a_final_line(sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    async with running_server(path):
        for args in (["vm", "create", "p", "--mem-mib", "64", "--program", "memwriter",
                      "--guest-param", "working_set_mib=16"], ["vm", "start", "p"]):  # fmt: skip
            assert (await _ctl("--socket", path, *args)).returncode == 0
        result = await _ctl("--socket", path, "snapshot", "create", "p", "--live", "--progress",
                            "--snapshot-path", "p.snap", "--mem-file-path", "p.mem",
                            cwd=sockdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    err = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", result.stderr.decode())  # terminal codes
    assert re.search(r"pass-\d", err)  # the bar's last render names the live pass as its phase
    final = [line for line in err.splitlines() if line.startswith("snapshot.create: ")]
    assert len(final) == 1 and "/s, " in final[0] and "phase(s))" in final[0]
