"""Shared test configuration.

Tests marked ``kvm`` drive real KVM guests. They are skipped, with the reason
printed, only where ``/dev/kvm`` is absent; the run's summary always says how
many KVM tests ran.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

KVM_AVAILABLE = os.access("/dev/kvm", os.R_OK | os.W_OK)
_KVM_SKIP_REASON = "needs /dev/kvm, which is absent or not accessible on this host"

_kvm_outcomes: dict[str, int] = {"passed": 0, "failed": 0, "skipped": 0}
# Node ids of tests carrying the ``kvm`` marker (not merely living in tests/kvm/).
_kvm_nodeids: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason=_KVM_SKIP_REASON)
    for item in items:
        if item.get_closest_marker("kvm") is None:
            continue
        _kvm_nodeids.add(item.nodeid)
        if not KVM_AVAILABLE:
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.nodeid not in _kvm_nodeids:
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        _kvm_outcomes[report.outcome] = _kvm_outcomes.get(report.outcome, 0) + 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    ran = _kvm_outcomes["passed"] + _kvm_outcomes["failed"]
    terminalreporter.write_line(
        f"KVM tests: {ran} ran ({_kvm_outcomes['passed']} passed, "
        f"{_kvm_outcomes['failed']} failed), {_kvm_outcomes['skipped']} skipped"
        + ("" if KVM_AVAILABLE else f" ({_KVM_SKIP_REASON})")
    )


# --- A short socket directory, shared by tests/api, tests/cli and tests/server ---------------
# (Imports kept here: this shared file is edited append-only.)
import contextlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A fresh short directory under /tmp (Unix socket paths are limited to 107 bytes)."""
    path = tempfile.mkdtemp(prefix="sqd-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- VM processes (issue 11): one private state dir per run, and no VM process left behind ---
# Every squibd this suite starts (subprocess daemons included) keeps its journals and its
# VM-process records in one state dir made for the run (``SQUIBD_STATE_DIR``), not in the
# host's /var/lib/squibd/state. A daemon stopped with on_shutdown = "keep" leaves its VM
# processes running, as it should; this process is made their subreaper, so they become its
# children, and each test ends by killing the ones it left (a spinning guest would otherwise
# take a core from every later test).
import ctypes  # noqa: E402
import signal  # noqa: E402

from squibd.vmm.zygote import VM_PROCESS_NAME, ZYGOTE_NAME  # noqa: E402

_PR_SET_CHILD_SUBREAPER = 36
_RUN_STATE_DIR = tempfile.mkdtemp(prefix="sqst-", dir="/tmp")
os.environ["SQUIBD_STATE_DIR"] = _RUN_STATE_DIR
ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _children_named(*names: str) -> list[int]:
    """Pids of this process's children whose ``/proc/PID/comm`` is one of ``names``."""
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")].decode(errors="replace")
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        if ppid == me and comm in names:
            found.append(int(entry))
    return found


def _kill_and_reap(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


@pytest.fixture(autouse=True)
def _no_vm_process_left_behind() -> Iterator[None]:
    """Kill the VM processes (and orphaned zygotes) a test's daemons left running."""
    zygotes_before = set(_children_named(ZYGOTE_NAME))
    yield
    _kill_and_reap([pid for pid in _children_named(ZYGOTE_NAME) if pid not in zygotes_before])
    _kill_and_reap(_children_named(VM_PROCESS_NAME))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_RUN_STATE_DIR, ignore_errors=True)
