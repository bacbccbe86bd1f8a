"""The offline tools take paths relative to the caller's working directory, as squibctl does.

Regression: ``squibd --describe-snapshot vm.snap`` and ``squibd --rebase-snapshot
--base full.snap ...`` answered InvalidPath "must be absolute" although the
README shows the same relative spellings for squibctl.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.snapshot.test_rebase import PAGE, fake_vm


def _daemon(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "squibd.cli.daemon", *args], cwd=cwd,
                          capture_output=True, text=True, check=False, timeout=120)  # fmt: skip


def test_describe_and_rebase_resolve_relative_paths(tmp_path: Path) -> None:
    with fake_vm() as vm:
        vm.write(0, b"a" * PAGE)
        vm.save("Full", tmp_path / "full.snap")
        vm.write(PAGE, b"b" * PAGE)
        vm.save("Diff", tmp_path / "d1.snap")
    described = _daemon(tmp_path, "--describe-snapshot", "full.snap", "--json",
                        "--mem-file-path", "full.mem", "--verify", "full")  # fmt: skip
    assert described.returncode == 0, described.stdout
    assert json.loads(described.stdout)["ok"] is True
    rebased = _daemon(tmp_path, "--rebase-snapshot", "--base", "full.snap", "--diff", "d1.snap",
                      "--output", "out.snap", "--output-mem-file-path", "out.mem")  # fmt: skip
    assert rebased.returncode == 0, rebased.stderr
    assert (tmp_path / "out.snap").is_file() and (tmp_path / "out.mem").is_file()
    missing = _daemon(tmp_path, "--describe-snapshot", "nope.snap")
    assert missing.returncode == 1  # not loadable: 1 (2 is kept for usage errors)
    assert str(tmp_path / "nope.snap") in missing.stdout


def test_squibctl_into_a_closed_pipe_has_no_traceback() -> None:
    # `squibctl completion bash | head -1`: the reader is gone before the output ends.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "squibd.cli.ctl", "completion", "bash"],
                                stdout=write_end, stderr=subprocess.PIPE, timeout=60,
                                check=False)  # fmt: skip
    finally:
        os.close(write_end)
    assert b"Traceback" not in result.stderr and b"BrokenPipe" not in result.stderr
    assert result.returncode == 1


@pytest.mark.parametrize(
    "mode",
    ["--describe-snapshot", "--rebase-snapshot", "--page-server", "--firecracker-api-socket"],
)
def test_every_mode_shows_help_right_after_its_flag(mode: str, tmp_path: Path) -> None:
    # Regression: `squibd --firecracker-api-socket --help` exited 2 ("expected one argument").
    result = _daemon(tmp_path, mode, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and mode in result.stdout
