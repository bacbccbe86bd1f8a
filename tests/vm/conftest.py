"""Fixtures of the VM runtime tests: a runtime per test, torn down with its VMs."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from squibd.vm.models import DEFAULT_VM_ISOLATION
from squibd.vm.runtime import Runtime

#: The runtime tests run against both runtimes: VM processes (the default) and VMs in
#: this process. ``SQUIBD_TEST_VM_ISOLATION=process`` (or ``inprocess``) runs one only.
_CHOSEN = os.environ.get("SQUIBD_TEST_VM_ISOLATION")
VM_ISOLATIONS = (_CHOSEN,) if _CHOSEN else (DEFAULT_VM_ISOLATION, "inprocess")
#: The runtime of tests that build their own ``Runtime``.
VM_ISOLATION = VM_ISOLATIONS[0]

#: Short enough that a test provoking a quiesce timeout stays fast.
TEST_QUIESCE_TIMEOUT_S = 0.5
#: The other tests must never see a quiesce time out on a loaded, shared
#: host (outliers of hundreds of ms were measured), so they wait long.
PATIENT_QUIESCE_TIMEOUT_S = 30.0


@pytest.fixture(params=VM_ISOLATIONS)
def vm_isolation(request: pytest.FixtureRequest) -> str:
    """Each runtime in turn (see ``VM_ISOLATIONS``)."""
    mode: str = request.param
    return mode


@pytest.fixture
async def runtime(vm_isolation: str) -> AsyncIterator[Runtime]:
    """A fresh runtime; every VM it still holds is destroyed afterwards."""
    rt = Runtime(quiesce_timeout_s=PATIENT_QUIESCE_TIMEOUT_S, vm_isolation=vm_isolation)
    try:
        yield rt
    finally:
        await rt.aclose()


@pytest.fixture
async def impatient_runtime(vm_isolation: str) -> AsyncIterator[Runtime]:
    """A runtime whose quiesce scope is short: for tests that provoke a timeout."""
    rt = Runtime(quiesce_timeout_s=TEST_QUIESCE_TIMEOUT_S, vm_isolation=vm_isolation)
    try:
        yield rt
    finally:
        await rt.aclose()


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a save of more than that fails with ENOSPC mid-write."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)
