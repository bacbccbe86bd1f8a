"""A throwaway single-node Ceph cluster with its S3 gateway (mon + memstore OSD + RGW).

Everything lives under one directory; :func:`start_ceph` returns once the gateway
answers HTTP and a test user exists, :meth:`CephCluster.stop` kills each daemon by
its pid. Used by tests/store (session fixture) and bench/store.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from typing import Final

import attrs

PACKAGES: Final = ("ceph-mon", "ceph-osd", "radosgw", "ceph-common")
BINARIES: Final = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph")
ACCESS_KEY: Final = "squibdtestkey"
SECRET_KEY: Final = "squibdtestsecret"
_START_TIMEOUT_S: Final = 120.0


class CephUnavailable(Exception):
    """The Ceph packages are missing and cannot be installed here."""


def ensure_installed() -> None:
    """Install Debian's Ceph packages when missing (as root, with apt-get).

    Raises:
        CephUnavailable: not root, no apt-get, or the install failed.
    """
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise CephUnavailable("Ceph (ceph-mon, ceph-osd, radosgw) is not installed and "
                              "installing it needs root and apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise CephUnavailable(f"{' '.join(cmd)} failed: {done.stderr[-500:]}")
    if not all(shutil.which(b) for b in BINARIES):
        raise CephUnavailable("apt-get installed Ceph but its binaries are not on PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class CephCluster:
    """A running cluster: its directory, gateway endpoint and credentials."""

    directory: str
    endpoint: str
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def conf(self) -> str:
        return os.path.join(self.directory, "ceph.conf")

    def run(self, *args: str) -> str:
        done = subprocess.run([*list(args[:1]), "-c", self.conf, *args[1:]],
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()[-800:]}")
        return done.stdout

    def spawn(self, *args: str) -> None:
        """Start a daemon that forks into the background (its output goes to the log dir)."""
        log = os.path.join(self.directory, "log", f"{args[0]}.out")
        with open(log, "ab") as out:
            code = subprocess.run([*list(args[:1]), "-c", self.conf, *args[1:]],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  timeout=60, check=False).returncode
        if code != 0:
            raise RuntimeError(f"{' '.join(args)} exited {code}; see {log}")

    def stop(self) -> None:
        """Kill every daemon of the cluster by its pid (SIGKILL: memstore keeps nothing)."""
        run = os.path.join(self.directory, "run")
        if not os.path.isdir(run):
            return
        for name in os.listdir(run):
            if name.endswith(".pid"):
                with contextlib.suppress(OSError, ValueError), open(
                    os.path.join(run, name)
                ) as f:
                    os.kill(int(f.read().strip()), signal.SIGKILL)


def start_ceph(directory: str, *, memstore_bytes: int = 3 << 30) -> CephCluster:
    """Bring a cluster up under ``directory`` (must be empty or absent)."""
    ensure_installed()
    os.makedirs(directory, exist_ok=True)
    for sub in ("run", "log", "mon", "osd", "rgw"):
        os.makedirs(os.path.join(directory, sub), exist_ok=True)
    mon_port, rgw_port = _free_port(), _free_port()
    fsid = str(uuid.uuid4())
    d = directory
    conf = f"""[global]
fsid = {fsid}
mon host = [v1:127.0.0.1:{mon_port}]
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd crush chooseleaf type = 0
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
ms bind ipv4 = true
ms bind ipv6 = false
[mon.a]
mon data = {d}/mon
public addr = 127.0.0.1
[osd.0]
osd data = {d}/osd
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {d}/rgw
"""
    cluster = CephCluster(d, f"http://127.0.0.1:{rgw_port}")
    with open(cluster.conf, "w") as f:
        f.write(conf)
    try:
        monmap = os.path.join(d, "monmap")
        subprocess.run(["monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{mon_port}]",
                        "--fsid", fsid, monmap], capture_output=True, check=True)
        cluster.run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        cluster.spawn("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        for attempt in range(10):
            # the fresh mon may not answer commands yet ("problem getting command
            # descriptions"): ask again
            try:
                cluster.run("ceph", "osd", "new", osd_uuid, "0")
                break
            except RuntimeError:
                if attempt == 9:
                    raise
                time.sleep(0.5)
        cluster.run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        for attempt in range(5):
            # The OSD's first command to the mon sometimes leaves before it has the
            # monmap ("wrong fsid") and it exits: start it again.
            try:
                cluster.spawn("ceph-osd", "-i", "0")
                break
            except RuntimeError:
                if attempt == 4:
                    raise
        cluster.spawn("radosgw", "-n", "client.rgw.a")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(cluster.endpoint + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Ceph gateway did not answer within {_START_TIMEOUT_S} s")
            time.sleep(0.2)  # polling an external process's readiness
        cluster.run("radosgw-admin", "user", "create", "--uid=test", "--display-name=test",
                    f"--access-key={ACCESS_KEY}", f"--secret={SECRET_KEY}")
    except BaseException:
        cluster.stop()
        raise
    return cluster
