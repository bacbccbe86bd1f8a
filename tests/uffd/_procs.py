"""Runs ``squibd --page-server`` as a real separate process for the tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def page_server(snapshot: Path, sock: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    """Start the page server for ``snapshot``, wait for its ``listening`` line, stop it on exit."""
    with page_server_argv("--snapshot", str(snapshot), "--socket", str(sock), *extra) as proc:
        yield proc


@contextlib.contextmanager
def page_server_argv(*argv: str, prefix: tuple[str, ...] = ()) -> Iterator[subprocess.Popen[str]]:
    """``squibd --page-server ARGV``: wait for its ``listening`` line, kill it on exit.

    ``prefix`` runs it under another command (e.g. ``unshare ...``)."""
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "squibd.cli.daemon", "--page-server", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening"):
            proc.kill()
            _, err = proc.communicate()
            raise AssertionError(f"page server did not start: {line!r} {err}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def read_stderr_until(proc: subprocess.Popen[str], needle: str) -> list[str]:
    """Read the server's stderr lines until one contains ``needle`` (or EOF); returns them."""
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if needle in line:
            break
    return lines


def userfaultfds_of(pid: int) -> int:
    """How many userfaultfds process ``pid`` holds open (from /proc/PID/fd)."""
    count = 0
    fd_dir = Path(f"/proc/{pid}/fd")
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):
            if "userfaultfd" in entry.readlink().name:
                count += 1
    return count
