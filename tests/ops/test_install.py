"""A regular (not editable) install into a fresh venv works away from the source tree.

Kept fast: the venv reuses this environment's dependencies through a ``.pth``
line (no download), and squibd itself is built with ``--no-deps
--no-build-isolation`` from a copy of the tree (so no build files land in it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig

import pytest

import squibd
from tests.server.helpers import REPO

_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                 ".mypy_cache", ".ruff_cache", ".hypothesis", "bench")  # fmt: skip


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh venv with squibd installed from a copy of this tree; returns its bin dir."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    shutil.copytree(REPO, source, ignore=_IGNORE)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)  # fmt: skip
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = subprocess.run(
        [str(venv / "bin" / "python"), "-c", where],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    # Dependencies (and pip) from this environment; a bare path line does not run
    # the editable-install hook that lives there, so squibd itself is not visible.
    with open(os.path.join(purelib, "zz_deps.pth"), "w") as f:
        f.write(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
         "--no-build-isolation", "--disable-pip-version-check", "--no-cache-dir", str(source)],
        check=True, timeout=300, cwd=base,
    )  # fmt: skip
    shutil.rmtree(source)  # nothing may be read from it afterwards
    return str(venv / "bin")


def _run(bindir: str, *args: str, cwd: str = "/") -> subprocess.CompletedProcess[str]:
    return subprocess.run([os.path.join(bindir, args[0]), *args[1:]], capture_output=True,
                          text=True, timeout=120, cwd=cwd)  # fmt: skip


def test_entry_points_report_the_version_and_import_the_installed_copy(installed: str) -> None:
    for tool in ("squibd", "squibctl"):
        result = _run(installed, tool, "--version")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"{tool} {squibd.__version__}"
    where = _run(installed, "python", "-c", "import squibd; print(squibd.__file__)")
    assert where.stdout.startswith(os.path.dirname(installed))  # not the source tree


def test_protocol_files_are_package_data(installed: str) -> None:
    code = ("import importlib.resources as r, json; p = r.files('squibd') / 'protocol'; "
            "print(json.dumps(sorted(x.name for x in p.iterdir())))")  # fmt: skip
    names = json.loads(_run(installed, "python", "-c", code).stdout)
    assert {"openrpc.json", "errors.json", "examples"} <= set(names)
    shipped = _run(installed, "squibctl", "protocol", "openrpc.json")
    with open(os.path.join(REPO, "protocol", "openrpc.json")) as f:
        assert shipped.stdout == f.read()


@pytest.mark.kvm
def test_the_installed_daemon_saves_a_vm(installed: str, sockdir: str) -> None:
    path = f"{sockdir}/s.sock"
    notify_path = f"{sockdir}/notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(120)  # a hang guard
        proc = subprocess.Popen(
            [os.path.join(installed, "squibd"), "--socket", path, "--state-dir",
             f"{sockdir}/state"], cwd="/",
            env={**os.environ, "NOTIFY_SOCKET": notify_path},
        )  # fmt: skip
        try:
            while b"READY=1" not in notify.recv(4096).split(b"\n"):
                pass
            for args in (["vm", "create", "i", "--mem-mib", "32"], ["vm", "start", "i"],
                         ["snapshot", "create", "i", "--snapshot-path", "i.snap",
                          "--mem-file-path", "i.mem", "--json"]):  # fmt: skip
                result = _run(installed, "squibctl", "--socket", path, *args, cwd=sockdir)
                assert result.returncode == 0, result.stderr
            assert json.loads(result.stdout)["snapshot_path"] == f"{sockdir}/i.snap"
            described = _run(installed, "squibctl", "--socket", path, "snapshot", "describe",
                             "i.snap", "--verify", "full", cwd=sockdir)  # fmt: skip
            assert described.returncode == 0, described.stdout
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_units_verify_with_the_installed_path(installed: str, tmp_path: str) -> None:
    units = os.path.join(str(tmp_path), "units")
    os.makedirs(units)
    # What `make install PREFIX=...` writes: ExecStart at PREFIX/bin/squibd.
    with open(os.path.join(REPO, "systemd", "squibd.service")) as f:
        service = f.read()
    assert "ExecStart=/usr/local/bin/squibd $SQUIBD_ARGS" in service
    assert "--config" not in service.split("ExecStart=")[1].splitlines()[0]
    with open(os.path.join(units, "squibd.service"), "w") as f:
        f.write(service.replace("/usr/local/bin/squibd", os.path.join(installed, "squibd")))
    shutil.copy(os.path.join(REPO, "systemd", "squibd.socket"), units)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"{units}/squibd.socket", f"{units}/squibd.service"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shipped = subprocess.run(  # as shipped, ExecStart names a path that must exist to verify
        ["systemd-analyze", "verify", os.path.join(REPO, "systemd", "squibd.socket")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert shipped.returncode == 0, shipped.stderr
