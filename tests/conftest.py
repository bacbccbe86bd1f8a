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
