"""Hostile file-system input against a real daemon (issue 10: writing outside the roots;
symlinks, FIFOs and directories; crashes, EROFS and ENOSPC).

Every daemon here is a real ``squibd`` process with its own ``--state-dir`` and
``allowed_roots``; guests are real KVM guests where a save is needed.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from squibd.snapshot.envelope import encode_state
from squibd.snapshot.statedir import StateDir
from tests.server.helpers import REPO, daemon_command
from tests.snapshot._states import sample_manifest, sample_x86_state

#: A hang guard for every socket read (never a timing assertion).
GUARD_S = 60.0
SECRET = b"root:$6$not-for-clients$"


@attrs.define
class Daemon:
    """A squibd process and where it keeps things."""

    proc: subprocess.Popen[bytes]
    sock: str
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(GUARD_S)

    def kill(self) -> None:
        # Under strace, ``proc`` is strace: the daemon it runs would outlive it.
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
            for pid in children.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        self.proc.kill()
        self.proc.wait(GUARD_S)


@attrs.define
class Env:
    """A short base directory holding the socket, the state dir, the root and outside files."""

    base: Path
    root: Path
    state: Path
    outside: Path
    config: Path
    daemons: list[Daemon] = attrs.Factory(list)

    def start(self, *extra: str, strace: tuple[str, ...] = ()) -> Daemon:
        """Start squibd; return once it sent READY=1 (or fail with its log)."""
        sock = str(self.base / "s.sock")
        notify_path = str(self.base / f"notify-{secrets.token_hex(4)}")
        log = self.base / f"daemon-{len(self.daemons)}.log"
        command = [*strace, *daemon_command(
            "--socket", sock, "--config", str(self.config), "--state-dir", str(self.state),
            "--debug-api", *extra)]  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, open(log, "wb") as out:
            notify.bind(notify_path)
            notify.settimeout(GUARD_S)
            proc = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=out,
                                    env={**os.environ, "NOTIFY_SOCKET": notify_path})  # fmt: skip
            daemon = Daemon(proc, sock, log)
            self.daemons.append(daemon)
            try:
                while b"READY=1" not in notify.recv(4096).split(b"\n"):
                    pass
            except TimeoutError:
                raise AssertionError(f"daemon never got ready: {log.read_text()}") from None
        return daemon


@pytest.fixture
def env() -> Iterator[Env]:
    base = Path(os.path.realpath(tempfile.mkdtemp(prefix="sqh-", dir="/tmp")))
    root, state, outside = base / "root", base / "state", base / "outside"
    root.mkdir()
    outside.mkdir()
    config = base / "squibd.toml"
    config.write_text(f'[snapshot]\nallowed_roots = ["{root}"]\n')
    environment = Env(base, root, state, outside, config)
    try:
        yield environment
    finally:
        for daemon in environment.daemons:
            if daemon.proc.poll() is None:
                daemon.kill()
        subprocess.run(["umount", "-l", str(root / "small")], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


class Client:
    """A blocking JSON-RPC client that keeps notifications apart."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(GUARD_S)
        self.sock.connect(path)
        self.buffer = b""
        self.next_id = 0
        self.answers: dict[int, dict[str, Any]] = {}  # read while waiting for another id

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, params: dict[str, Any]) -> int:
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}
        self.sock.sendall(json.dumps(message).encode() + b"\n")
        return self.next_id

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        message: dict[str, Any] = json.loads(line)
        return message

    def answer(self, request_id: int) -> dict[str, Any]:
        while request_id not in self.answers:
            message = self.read()
            if "id" in message:
                self.answers[message["id"]] = message
        return self.answers.pop(request_id)

    def call(self, method: str, params: dict[str, Any]) -> Any:
        answer = self.answer(self.send(method, params))
        assert "error" not in answer, answer
        return answer["result"]

    def error(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        answer = self.answer(self.send(method, params))
        assert "error" in answer, answer
        error: dict[str, Any] = answer["error"]
        return error


def kind_of(error: dict[str, Any]) -> str:
    kind: str = error.get("data", {}).get("kind", "")
    return kind


def temps_and_journals(env: Env) -> list[str]:
    found = [str(p) for p in env.root.rglob("*") if ".squibd-" in p.name]
    if (env.state / "journal").exists():
        found += os.listdir(env.state / "journal")
    return found


def pair_bytes(snap: Path, mem: Path) -> tuple[bytes | None, bytes | None]:
    return (snap.read_bytes() if snap.exists() else None,
            mem.read_bytes() if mem.exists() else None)  # fmt: skip


def write_state_pair(snap: Path, mem: Path) -> None:
    """A valid little pair (state file + memory file of the manifest's size)."""
    manifest = sample_manifest(1)
    snap.write_bytes(encode_state(sample_x86_state(1, 1, manifest=manifest)))
    mem.write_bytes(b"")
    os.truncate(mem, manifest.file_size)  # sparse: it fits a tiny tmpfs


# --- symlinks, FIFOs, directories, sockets, devices as inputs ---------------------------


def test_a_symlink_to_a_secret_outside_the_roots_is_never_read(env: Env) -> None:
    secret = env.outside / "shadow"
    secret.write_bytes(SECRET + b"\0" * 64)
    os.chmod(secret, 0o600)
    (env.root / "x.snap").symlink_to(secret)
    (env.root / "x.mem").symlink_to(secret)
    (env.root / "ok.snap").write_bytes(b"")  # a regular file, for the memory-file cases
    daemon = env.start()
    client = Client(daemon.sock)
    try:
        described = client.call("snapshot.describe", {"snapshot_path": str(env.root / "x.snap")})
        assert described["ok"] is False
        assert described["errors"][0]["kind"] == "InvalidPath"
        assert "symbolic link" in described["errors"][0]["message"]
        assert "not-for-clients" not in json.dumps(described)
        load = client.error("snapshot.load", {
            "vm_id": "v", "snapshot_path": str(env.root / "x.snap"),
            "mem_file_path": str(env.root / "x.mem")})  # fmt: skip
        assert kind_of(load) == "InvalidPath" and "symbolic link" in load["message"]
        rebase = client.error("snapshot.rebase", {
            "base_snapshot_path": str(env.root / "x.snap"),
            "diff_snapshot_path": str(env.root / "x.snap"),
            "output_snapshot_path": str(env.root / "out.snap")})  # fmt: skip
        assert kind_of(rebase) == "InvalidPath"
        assert not (env.root / "out.snap").exists()
    finally:
        client.close()
        daemon.stop()


def test_a_symlinked_parent_pointing_outside_the_roots_is_refused(env: Env) -> None:
    write_state_pair(env.outside / "a.snap", env.outside / "a.mem")
    (env.root / "sub").symlink_to(env.outside)
    daemon = env.start()
    client = Client(daemon.sock)
    try:
        load = client.error("snapshot.load", {
            "vm_id": "v", "snapshot_path": str(env.root / "sub" / "a.snap"),
            "mem_file_path": str(env.root / "sub" / "a.mem")})  # fmt: skip
        assert kind_of(load) == "InvalidPath" and "outside the allowed roots" in load["message"]
    finally:
        client.close()
        daemon.stop()


def test_fifos_never_block_the_daemon(env: Env) -> None:
    """More FIFOs than worker threads: each is refused at once, nothing waits for a writer."""
    count = 48
    for index in range(count):
        os.mkfifo(env.root / f"{index}.snap")
    daemon = env.start()
    client = Client(daemon.sock)
    try:
        ids = [client.send("snapshot.describe", {"snapshot_path": str(env.root / f"{i}.snap")})
               for i in range(count)]  # fmt: skip
        for request_id in ids:
            answer = client.answer(request_id)["result"]
            assert answer["errors"][0]["kind"] == "InvalidPath"
            assert "is a FIFO" in answer["errors"][0]["message"]
        write_state_pair(env.root / "p.snap", env.root / "p.mem")
        os.unlink(env.root / "p.mem")
        os.mkfifo(env.root / "p.mem")  # a good state file, a FIFO as memory file
        load = client.error("snapshot.load", {
            "vm_id": "v", "snapshot_path": str(env.root / "p.snap"),
            "mem_file_path": str(env.root / "p.mem")})  # fmt: skip
        assert kind_of(load) == "InvalidPath" and "is a FIFO" in load["message"]
        assert client.call("daemon.status", {})  # still answering
    finally:
        client.close()
        daemon.stop()


def test_directories_sockets_and_devices_are_refused_as_inputs(env: Env) -> None:
    (env.root / "directory.snap").mkdir()
    os.mknod(env.root / "device.snap", 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero twin
    holder = socket.socket(socket.AF_UNIX)
    holder.bind(str(env.root / "socket.snap"))
    daemon = env.start()
    client = Client(daemon.sock)
    try:
        for kind, what in (("directory", "a directory"), ("socket", "a socket"),
                           ("device", "a character device")):  # fmt: skip
            load = client.error("snapshot.load", {
                "vm_id": "v", "snapshot_path": str(env.root / f"{kind}.snap"),
                "mem_file_path": str(env.root / "x.mem")})  # fmt: skip
            assert kind_of(load) == "InvalidPath", load
            assert f"snapshot_path is {what}, not a regular file" in load["message"]
    finally:
        client.close()
        daemon.stop()
        holder.close()


# --- forged journals and the state directory ---------------------------------------------


def test_forged_journals_are_ignored_or_quarantined_and_the_daemon_starts(env: Env) -> None:
    victim = env.root / "victim"
    victim.write_bytes(b"precious")
    temp = env.root / ".victim.squibd-tmp-mem.00ff"
    temp.write_bytes(b"attacker")
    in_root = env.root / ".x.snap.squibd-journal.00ff"
    in_root.write_text(json.dumps({"journal": 1, "txid": "00ff", "snapshot_path": "x",
                                   "mem_file_path": str(victim), "mem_tmp": str(temp)}) + "\n")
    StateDir.open(str(env.state))  # as the daemon would create it (same uid)
    forged = env.state / "journal" / f"{'ab' * 16}.00ff.journal"
    forged.write_text(in_root.read_text() + '{"commit": "00ff"}\tdeadbeef\n')
    daemon = env.start()
    daemon.stop()
    assert victim.read_bytes() == b"precious"
    assert temp.exists() and in_root.exists()  # not ours: never touched
    assert os.listdir(env.state / "journal") == []
    assert os.listdir(env.state / "quarantine") == [forged.name]
    assert f"journal {forged.name} (snapshot ?) quarantined" in daemon.log.read_text()


def test_reserved_names_and_the_state_dir_are_refused_as_destinations(env: Env) -> None:
    daemon = env.start()
    client = Client(daemon.sock)
    try:
        for snap in (env.root / ".a.snap.squibd-tmp-state.00ff",
                     env.root / ".a.snap.squibd-journal.00ff"):  # fmt: skip
            error = client.error("snapshot.create", {
                "vm_id": "v", "snapshot_path": str(snap),
                "mem_file_path": str(env.root / "a.mem")})  # fmt: skip
            assert kind_of(error) == "InvalidPath" and "reserved" in error["message"]
    finally:
        client.close()
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to own a directory as another user")
def test_a_state_dir_of_another_user_stops_the_start_with_a_clear_message(env: Env) -> None:
    env.state.mkdir()
    os.chown(env.state, 65534, 65534)
    result = subprocess.run(
        daemon_command("--socket", str(env.base / "s.sock"), "--config", str(env.config),
                       "--state-dir", str(env.state)),
        cwd=REPO, capture_output=True, text=True, timeout=GUARD_S, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "belongs to uid 65534" in result.stderr
    assert not (env.base / "s.sock").exists()


# --- saves against a real KVM guest: destinations, crashes, EROFS, ENOSPC ---------------


def create_vm(client: Client, vm_id: str = "v") -> None:
    client.call("vm.create", {"vm_id": vm_id, "vcpu_count": 1, "mem_size_mib": 64,
                              "track_dirty_pages": True, "guest": {"program": "counter"}})
    client.call("vm.start", {"vm_id": vm_id})


def save(client: Client, snap: Path, mem: Path, **extra: Any) -> Any:
    return client.call("snapshot.create", {"vm_id": "v", "snapshot_path": str(snap),
                                           "mem_file_path": str(mem), **extra})


def save_error(client: Client, snap: Path, mem: Path) -> dict[str, Any]:
    return client.error("snapshot.create", {"vm_id": "v", "snapshot_path": str(snap),
                                            "mem_file_path": str(mem)})


@pytest.mark.kvm
def test_a_bad_destination_is_refused_before_anything_is_written(env: Env) -> None:
    snap, mem = env.root / "a.snap", env.root / "a.mem"
    (env.root / "directory.snap").mkdir()
    os.mkfifo(env.root / "fifo.snap")
    (env.root / "symlink.snap").symlink_to(env.outside / "created-outside")
    daemon = env.start()
    client = Client(daemon.sock)
    try:
        create_vm(client)
        save(client, snap, mem)
        old = pair_bytes(snap, mem)
        for kind, what in (("directory", "a directory"), ("fifo", "a FIFO"),
                           ("symlink", "a symbolic link")):  # fmt: skip
            # The memory file is the old pair's: it must not be renamed over before the refusal.
            error = save_error(client, env.root / f"{kind}.snap", mem)
            assert kind_of(error) == "InvalidPath", error
            assert f"snapshot_path exists and is {what}, not a regular file" in error["message"]
            assert pair_bytes(snap, mem) == old
            assert temps_and_journals(env) == []
        assert not (env.outside / "created-outside").exists()
        assert client.call("daemon.status", {})
    finally:
        client.close()
        daemon.stop()


@pytest.mark.kvm
def test_sigkill_mid_save_then_restart_leaves_old_or_new_pair(env: Env) -> None:
    snap, mem = env.root / "sub" / "a.snap", env.root / "sub" / "a.mem"
    snap.parent.mkdir()
    daemon = env.start()
    client = Client(daemon.sock)
    create_vm(client)
    save(client, snap, mem)
    old = pair_bytes(snap, mem)
    client.send("snapshot.create", {"vm_id": "v", "snapshot_path": str(snap),
                                    "mem_file_path": str(mem), "progress_token": "t"})
    while client.read().get("method") != "$/progress":
        pass
    daemon.kill()  # somewhere in the save: streaming, commit or rename
    client.close()
    restarted = env.start()
    restarted.stop()
    got = pair_bytes(snap, mem)
    assert got == old or (got[0] != old[0] and got[1] != old[1]), "torn pair after recovery"
    assert temps_and_journals(env) == []


STRACE = shutil.which("strace")


def traced(nth_rename: int) -> tuple[str, ...]:
    """strace options that SIGKILL the daemon on entry to its ``nth_rename`` renameat."""
    assert STRACE is not None
    # (No --seccomp-bpf: strace 6.1 then skips the injection.) Counting is per thread,
    # and a save's two renames run in the same worker thread.
    return (STRACE, "-f", "-qq", "-o", "/dev/null", "-e", "trace=renameat",
            "-e", f"inject=renameat:signal=KILL:when={nth_rename}")


@pytest.mark.kvm
@pytest.mark.skipif(STRACE is None, reason="needs strace (syscall fault injection)")
def test_sigkill_between_the_two_renames_of_a_save_rolls_forward_at_restart(env: Env) -> None:
    snap, mem = env.root / "a.snap", env.root / "a.mem"
    daemon = env.start()
    client = Client(daemon.sock)
    create_vm(client)
    save(client, snap, mem)
    old = pair_bytes(snap, mem)
    client.close()
    daemon.stop()
    daemon = env.start(strace=traced(2))
    client = Client(daemon.sock)
    # The VM process outlived the first daemon: this one re-attached it.
    assert [vm["vm_id"] for vm in client.call("vm.list", {})["vms"]] == ["v"]
    with pytest.raises(ConnectionError):
        save(client, snap, mem)  # killed on entry to the state file's rename
    client.close()
    daemon.proc.wait(GUARD_S)
    torn = pair_bytes(snap, mem)
    assert torn[0] == old[0] and torn[1] != old[1]  # the torn instant recovery exists for
    # A daemon killed while its start-up recovery renames: the next start finishes the job.
    dying = subprocess.run([*traced(1), *daemon_command(
        "--socket", str(env.base / "s.sock"), "--config", str(env.config),
        "--state-dir", str(env.state))], cwd=REPO, capture_output=True, timeout=GUARD_S,
        check=False)  # fmt: skip
    assert dying.returncode == -signal.SIGKILL, dying.stderr
    assert pair_bytes(snap, mem) == torn and os.listdir(env.state / "journal")
    restarted = env.start()
    restarted.stop()
    got = pair_bytes(snap, mem)
    assert got[0] != old[0] and got[1] == torn[1]  # the whole new pair
    assert temps_and_journals(env) == []
    assert "rolled forward" in restarted.log.read_text()


@pytest.mark.kvm
@pytest.mark.skipif(STRACE is None, reason="needs strace (syscall fault injection)")
def test_sigkill_during_rebase_then_restart_gives_the_new_pair(env: Env) -> None:
    full, diff, out = env.root / "f.snap", env.root / "d.snap", env.root / "o.snap"
    daemon = env.start()
    client = Client(daemon.sock)
    create_vm(client)
    save(client, full, env.root / "f.mem")
    client.call("vm.pause", {"vm_id": "v"})
    save(client, diff, env.root / "d.mem", snapshot_type="Diff")
    client.close()
    daemon.stop()
    daemon = env.start(strace=traced(2))
    client = Client(daemon.sock)
    with pytest.raises(ConnectionError):
        client.call("snapshot.rebase", {"base_snapshot_path": str(full),
                                        "diff_snapshot_path": str(diff),
                                        "output_snapshot_path": str(out)})  # fmt: skip
    client.close()
    daemon.proc.wait(GUARD_S)
    assert not out.exists() and (env.root / "o.mem").exists()  # torn: memory file only
    restarted = env.start()
    client = Client(restarted.sock)
    try:
        described = client.call("snapshot.describe", {"snapshot_path": str(out),
                                                      "verify": "full"})  # fmt: skip
        assert described["ok"] is True, described
    finally:
        client.close()
        restarted.stop()
    assert temps_and_journals(env) == []


def mount_small(env: Env, size: str) -> Path:
    small = env.root / "small"
    small.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(small)],
                            capture_output=True, check=False)  # fmt: skip
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    return small


def fill_guest(client: Client, size: int) -> None:
    chunk = 256 * 1024
    for offset in range(0, size, chunk):
        data = base64.b64encode(os.urandom(chunk)).decode()
        client.call("vm.write_memory", {"vm_id": "v", "guest_addr": 32 * 1024 * 1024 + offset,
                                        "data_base64": data})  # fmt: skip


@pytest.mark.kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_enospc_and_erofs_destinations_give_typed_errors_and_keep_the_old_pair(env: Env) -> None:
    small = mount_small(env, "1m")
    snap, mem = small / "a.snap", small / "a.mem"
    write_state_pair(snap, mem)  # an old pair that fits
    old = pair_bytes(snap, mem)
    daemon = env.start()
    client = Client(daemon.sock)
    try:
        create_vm(client)
        fill_guest(client, 2 * 1024 * 1024)  # more than the tmpfs holds
        full = save_error(client, snap, mem)
        assert kind_of(full) == "MemoryIo", full
        assert full["data"]["fault_message"] == (
            "memory file I/O error: No space left on device (os error 28)")
        assert pair_bytes(snap, mem) == old and temps_and_journals(env) == []
        subprocess.run(["mount", "-o", "remount,ro", str(small)], check=True)
        read_only = save_error(client, snap, mem)
        assert kind_of(read_only) == "Io", read_only
        assert read_only["data"]["fault_message"] == (
            "snapshot I/O error: Read-only file system (os error 30)")
        assert pair_bytes(snap, mem) == old and temps_and_journals(env) == []
        assert client.call("vm.describe", {"vm_id": "v"})["state"] == "Running"
    finally:
        client.close()
        daemon.stop()


def test_concurrent_describes_of_fifos_leave_no_thread_stuck(env: Env) -> None:
    """Several clients at once (threads here): every call is answered."""
    for index in range(8):
        os.mkfifo(env.root / f"{index}.mem")
    write_state_pair(env.root / "s.snap", env.root / "s.mem")
    daemon = env.start()
    answers: list[str] = []

    def one(index: int) -> None:
        client = Client(daemon.sock)
        try:
            described = client.call("snapshot.describe", {
                "snapshot_path": str(env.root / "s.snap"),
                "mem_file_path": str(env.root / f"{index}.mem"), "verify": "full"})  # fmt: skip
            answers.append(described["errors"][0]["kind"])
        finally:
            client.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    daemon.stop()
    assert answers == ["InvalidPath"] * 8



@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_the_page_server_refuses_a_fifo_or_symlink_memory_file(env: Env, kind: str) -> None:
    snap, mem = env.root / "p.snap", env.root / "p.mem"
    write_state_pair(snap, mem)
    os.rename(mem, env.outside / "p.mem")
    if kind == "fifo":
        os.mkfifo(mem)
    else:
        mem.symlink_to(env.outside / "p.mem")
    result = subprocess.run(
        daemon_command("--page-server", "--snapshot", str(snap), "--memory-file", str(mem),
                       "--socket", str(env.base / "ps.sock")),
        cwd=REPO, capture_output=True, text=True, timeout=GUARD_S, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    expected = "is a FIFO" if kind == "fifo" else "is a symbolic link"
    assert f"invalid snapshot path: memory file {expected}, not a regular file" in result.stderr
