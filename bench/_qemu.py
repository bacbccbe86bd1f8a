"""QEMU baseline for the benchmarks: install, launch, and a tiny QMP client.

Theory of operation
-------------------
``bench/vs_qemu.py`` compares squibd with what users would pick instead:
QEMU (7.2 from Debian) saving a VM with ``migrate`` to a file descriptor.
This module holds the QEMU side, stdlib only:

- :func:`ensure_qemu` finds ``qemu-system-x86_64`` or installs the Debian
  package ``qemu-system-x86`` (``apt-get update`` once, then install);
  it raises :class:`QemuUnavailable` with the reason when that fails.
- :class:`QemuProcess` starts QEMU with KVM, no NIC, no display, its RAM
  from a ``memory-backend-file`` (``share=on``) that the caller filled
  beforehand, and QMP on a Unix socket; it always kills QEMU on exit.
- :class:`Qmp` speaks QMP (JSON lines over the socket): the greeting, the
  ``qmp_capabilities`` handshake, commands, and ``getfd`` with the file
  descriptor passed as ``SCM_RIGHTS`` ancillary data. Asynchronous events
  arriving between replies are kept in :attr:`Qmp.events`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import attrs

QEMU_BINARY = "qemu-system-x86_64"
# Debian package holding qemu-system-x86_64 (bookworm: QEMU 7.2).
QEMU_PACKAGE = "qemu-system-x86"
APT_TIMEOUT_S = 900.0
# QEMU creates its QMP socket shortly after exec; how long to retry connecting.
QMP_CONNECT_TIMEOUT_S = 30.0
QMP_CONNECT_RETRY_S = 0.02
QMP_READ_CHUNK = 65536
# Interval between query-migrate polls (QMP docs: poll query-migrate for status).
MIGRATE_POLL_S = 0.002
MIGRATE_TIMEOUT_S = 600.0
QEMU_EXIT_TIMEOUT_S = 10.0
# migrate-set-parameters max-bandwidth is bytes/s; default is 128 MiB/s (QEMU
# migration/migration.c MAX_THROTTLE). Raise it far above any disk here.
UNLIMITED_BANDWIDTH = 1 << 40
# Terminal states of query-migrate "status" (qapi/migration.json MigrationStatus).
MIGRATE_DONE = "completed"
MIGRATE_FAILED = frozenset({"failed", "cancelled"})


class QemuUnavailable(RuntimeError):
    """QEMU is not installed and could not be installed; the message says why."""


class QmpError(RuntimeError):
    """QEMU answered a QMP command with an error, or QMP closed unexpectedly."""


class MigrationFailed(RuntimeError):
    """query-migrate reported failed/cancelled, or the migration never finished."""


def ensure_qemu() -> str:
    """Path of qemu-system-x86_64, installing the Debian package if absent.

    Raises:
        QemuUnavailable: apt-get is missing or failed (its output tail is in the message).
    """
    found = shutil.which(QEMU_BINARY)
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise QemuUnavailable(f"{QEMU_BINARY} is absent and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", QEMU_PACKAGE]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=APT_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise QemuUnavailable(f"{' '.join(cmd)} failed: {exc}") from exc
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise QemuUnavailable(f"{' '.join(cmd)} exited {proc.returncode}: {' | '.join(tail)}")
    found = shutil.which(QEMU_BINARY)
    if not found:
        raise QemuUnavailable(f"{QEMU_PACKAGE} installed but {QEMU_BINARY} is not on PATH")
    return found


def qemu_version(binary: str) -> str:
    """First line of ``qemu-system-x86_64 --version``."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0].strip() if out.stdout else "unknown"


@attrs.define(eq=False)
class Qmp:
    """A connected QMP session (after the capabilities handshake)."""

    sock: socket.socket
    greeting: dict[str, Any]
    events: list[dict[str, Any]] = attrs.field(factory=list)
    _buf: bytes = b""

    @classmethod
    def connect(cls, path: str, *, timeout: float = QMP_CONNECT_TIMEOUT_S,
                proc: subprocess.Popen[bytes] | None = None) -> Qmp:
        """Connect to QMP at ``path`` (retrying while QEMU starts) and negotiate.

        Raises:
            QmpError: QEMU exited first, or the socket never accepted.
        """
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                if proc is not None and proc.poll() is not None:
                    raise QmpError(f"QEMU exited with {proc.returncode} before QMP was up") from exc
                if time.monotonic() > deadline:
                    raise QmpError(f"QMP socket {path} did not come up in {timeout} s") from exc
                time.sleep(QMP_CONNECT_RETRY_S)
        qmp = cls(sock=sock, greeting={})
        try:
            qmp.greeting = qmp._read_message()
            qmp.execute("qmp_capabilities")
        except (OSError, ValueError) as exc:  # QEMU died mid-handshake
            sock.close()
            raise QmpError(f"QMP handshake failed: {exc}") from exc
        return qmp

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_message(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(QMP_READ_CHUNK)
            if not chunk:
                raise QmpError("QMP connection closed by QEMU")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                fds: Sequence[int] = ()) -> Any:
        """Run one command and return its ``return`` value.

        ``fds`` are passed with the command as SCM_RIGHTS (for ``getfd``).

        Raises:
            QmpError: QEMU replied with ``error``.
        """
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)
        while True:
            reply = self._read_message()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                err = reply["error"]
                raise QmpError(f"{command}: {err.get('class')}: {err.get('desc')}")
            return reply.get("return")

    def wait_migration(self, *, timeout: float = MIGRATE_TIMEOUT_S) -> dict[str, Any]:
        """Poll ``query-migrate`` until completed; return the final info.

        Raises:
            MigrationFailed: failed/cancelled status, or no completion in ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            info: dict[str, Any] = self.execute("query-migrate")
            status = info.get("status")
            if status == MIGRATE_DONE:
                return info
            if status in MIGRATE_FAILED:
                raise MigrationFailed(f"migration {status}: {info.get('error-desc', info)}")
            if time.monotonic() > deadline:
                raise MigrationFailed(f"migration still {status} after {timeout} s")
            time.sleep(MIGRATE_POLL_S)


@attrs.define(eq=False)
class QemuProcess:
    """A QEMU process with KVM, no NIC, no display, RAM from a shared file.

    Use as a context manager; QEMU is killed and reaped on exit.
    """

    binary: str
    mem_path: str
    mem_mib: int
    qmp_path: str
    paused: bool = True
    proc: subprocess.Popen[bytes] | None = None
    qmp: Qmp | None = None

    def argv(self) -> list[str]:
        """The QEMU command line."""
        args = [
            self.binary,
            "-accel", "kvm",
            "-machine", "pc,memory-backend=ram0",
            "-m", f"{self.mem_mib}M",
            "-object",
            f"memory-backend-file,id=ram0,size={self.mem_mib}M,mem-path={self.mem_path},share=on",
            "-nodefaults", "-nic", "none", "-display", "none", "-vga", "none",
            "-serial", "none", "-monitor", "none",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.paused:
            args.append("-S")
        return args

    def start(self) -> Qmp:
        """Launch QEMU and return the negotiated QMP session."""
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            self.qmp = Qmp.connect(self.qmp_path, proc=self.proc)
        except QmpError as exc:
            err = self._stop()
            raise QmpError(f"{exc}; QEMU stderr: {err.strip()[-500:]}") from exc
        return self.qmp

    def _stop(self) -> str:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        err = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            _, err_b = self.proc.communicate(timeout=QEMU_EXIT_TIMEOUT_S)
            err = err_b.decode(errors="replace") if err_b else ""
            self.proc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_path)
        return err

    def __enter__(self) -> QemuProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop()


def migrate_to_file(qmp: Qmp, out_path: str, *, fd_name: str = "squibd-bench") -> dict[str, Any]:
    """Save the VM with ``migrate fd:NAME`` into ``out_path``, then fsync it.

    The file is created (truncated) here; the caller times this call.
    Returns the final query-migrate info.
    """
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        qmp.execute("getfd", {"fdname": fd_name}, fds=[fd])
        qmp.execute("migrate", {"uri": f"fd:{fd_name}"})
        info = qmp.wait_migration()
        os.fsync(fd)
    finally:
        os.close(fd)
    return info


def raise_bandwidth(qmp: Qmp) -> None:
    """Lift QEMU's migration bandwidth cap (default 128 MiB/s)."""
    qmp.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
