"""Opening client-named files safely (issue 10): one open, no final symlink, regular files only."""

from __future__ import annotations

import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from squibd.snapshot.commit import PairTransaction
from squibd.snapshot.errors import InvalidPath
from squibd.snapshot.paths import (
    JOURNAL_MARKER,
    TEMP_MARKER,
    check_destination,
    open_client_file,
    open_dest_dir,
    set_daemon_roots,
    validate_path,
)
from squibd.snapshot.statedir import StateDir, configure_state_dir


@pytest.fixture(autouse=True)
def state(tmp_path: Path) -> Iterator[StateDir]:
    opened = configure_state_dir(str(tmp_path / "state"))
    assert opened is not None
    try:
        yield opened
    finally:
        configure_state_dir(None)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def test_a_regular_file_inside_the_roots_opens_read_only(root: Path) -> None:
    (root / "a.snap").write_bytes(b"data")
    fd = open_client_file(str(root / "a.snap"), "snapshot_path", [str(root)])
    try:
        assert os.read(fd, 10) == b"data"
        assert os.get_inheritable(fd) is False
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


def test_a_final_symlink_is_refused_even_to_a_file_inside_the_roots(root: Path) -> None:
    (root / "real").write_bytes(b"data")
    (root / "link").symlink_to(root / "real")
    with pytest.raises(InvalidPath, match="snapshot_path is a symbolic link, not a regular file"):
        open_client_file(str(root / "link"), "snapshot_path", [str(root)])


def test_a_symlink_to_a_secret_outside_the_roots_is_refused(root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$secret")
    os.chmod(secret, 0o600)
    (root / "x.snap").symlink_to(secret)
    with pytest.raises(InvalidPath, match="symbolic link"):
        open_client_file(str(root / "x.snap"), "snapshot_path", [str(root)])


def test_a_symlinked_parent_pointing_outside_the_roots_is_refused(root: Path,
                                                                  tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.snap").write_bytes(b"data")
    (root / "sub").symlink_to(outside)
    with pytest.raises(InvalidPath, match="outside the allowed roots"):
        open_client_file(str(root / "sub" / "x.snap"), "snapshot_path", [str(root)])
    with pytest.raises(InvalidPath, match="outside the allowed roots"):
        open_dest_dir(str(root / "sub" / "y.snap"), "snapshot_path", [str(root)])


def test_a_symlinked_parent_inside_the_roots_is_fine(root: Path) -> None:
    (root / "real").mkdir()
    (root / "real" / "x.snap").write_bytes(b"data")
    (root / "alias").symlink_to(root / "real")
    os.close(open_client_file(str(root / "alias" / "x.snap"), "snapshot_path", [str(root)]))


def test_a_fifo_is_refused_without_blocking(root: Path) -> None:
    fifo = root / "x.snap"
    os.mkfifo(fifo)
    # No writer ever opens the FIFO: a blocking open would hang here forever.
    with pytest.raises(InvalidPath, match="snapshot_path is a FIFO, not a regular file"):
        open_client_file(str(fifo), "snapshot_path")


def test_many_fifos_from_many_threads_never_block(root: Path) -> None:
    outcomes: list[str] = []

    def worker(index: int) -> None:
        fifo = root / f"{index}.snap"
        os.mkfifo(fifo)
        try:
            open_client_file(str(fifo), "snapshot_path")
        except InvalidPath:
            outcomes.append("refused")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes == ["refused"] * 50


def test_directories_sockets_and_devices_are_refused(root: Path) -> None:
    (root / "dir").mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "sock"))
        cases = {"dir": "a directory", "sock": "a socket"}
        for name, kind in cases.items():
            with pytest.raises(InvalidPath, match=f"mem_file_path is {kind}"):
                open_client_file(str(root / name), "mem_file_path")
    with pytest.raises(InvalidPath, match="a character device"):
        open_client_file("/dev/null", "mem_file_path")


def test_a_missing_file_is_an_os_error(root: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_client_file(str(root / "nope"), "snapshot_path")


def test_a_file_as_parent_is_invalid(root: Path) -> None:
    (root / "file").write_bytes(b"")
    with pytest.raises(InvalidPath, match="parent that is not a directory"):
        open_client_file(str(root / "file" / "x"), "snapshot_path")


@pytest.mark.parametrize("marker", [TEMP_MARKER, JOURNAL_MARKER])
def test_reserved_names_are_refused(root: Path, marker: str) -> None:
    with pytest.raises(InvalidPath, match="reserved for squibd's temp and journal files"):
        validate_path(str(root / f".x.snap{marker}mem.00ff"))


def test_the_journal_key_and_the_journal_folders_are_refused(state: StateDir) -> None:
    for path in (os.path.join(state.path, "journal.key"), os.path.join(state.journal_dir, "x"),
                 os.path.join(state.quarantine_dir, "x"), os.path.join(state.path, "journal")):
        with pytest.raises(InvalidPath, match="inside squibd's private state directory"):
            validate_path(path)
    with pytest.raises(InvalidPath, match="inside squibd's private state directory"):
        os.close(open_client_file(os.path.join(state.path, "journal.key")))
    validate_path(os.path.join(state.path, "on-shutdown.snap"))  # squibd's own saves may go here


@pytest.mark.parametrize("kind", ["dir", "fifo", "symlink"])
def test_check_destination_refuses_non_regular_files(root: Path, kind: str) -> None:
    target = root / "x.snap"
    if kind == "dir":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to(root / "elsewhere")
    fd, real = open_dest_dir(str(target), "snapshot_path", [str(root)])
    try:
        assert real == str(root.resolve())
        with pytest.raises(InvalidPath, match="snapshot_path exists and is a"):
            check_destination(fd, "x.snap")
        check_destination(fd, "absent.snap")  # a new file is fine
    finally:
        os.close(fd)
    assert stat.S_ISLNK(os.lstat(target).st_mode) == (kind == "symlink")


def test_a_destination_in_a_missing_directory_is_invalid(root: Path) -> None:
    with pytest.raises(InvalidPath, match="in a directory that does not exist"):
        open_dest_dir(str(root / "missing" / "x.snap"))


@pytest.fixture
def daemon_roots(root: Path) -> Iterator[None]:
    set_daemon_roots([str(root)])
    try:
        yield
    finally:
        set_daemon_roots(None)


@pytest.mark.usefixtures("daemon_roots")
def test_daemon_roots_hold_at_the_open_even_without_roots_from_the_caller(
    root: Path, tmp_path: Path, state: StateDir
) -> None:
    """A parent swapped for a symlink after the handler's check is still caught at the open."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.snap").write_bytes(b"data")
    (root / "swapped").symlink_to(outside)
    with pytest.raises(InvalidPath, match="outside the allowed roots"):
        open_client_file(str(root / "swapped" / "x.snap"))
    with pytest.raises(InvalidPath, match="outside the allowed roots"):
        PairTransaction(str(root / "swapped" / "y.snap"), str(root / "y.mem"))
    assert sorted(os.listdir(outside)) == ["x.snap"]
    own = Path(state.path) / "saves"  # squibd's own files in its state dir stay reachable
    own.mkdir()
    with PairTransaction(str(own / "a.snap"), str(own / "a.mem")) as tx:
        tx.commit(b"state")
    os.close(open_client_file(str(own / "a.snap")))
