"""The exit-heavy ``exiter`` guest in a VM process: its work port is served there (issue 11)."""

from __future__ import annotations

from pathlib import Path

import pytest

from squibd.vm.remote import RemoteVm
from squibd.vm.runtime import Runtime
from tests.vm.test_exiter_snapshot import save_and_restore_exiter

pytestmark = pytest.mark.kvm


async def test_exiter_in_a_vm_process_survives_full_save_and_load(tmp_path: Path) -> None:
    rt = Runtime(quiesce_timeout_s=30.0, vm_isolation="process")
    try:
        loaded = await save_and_restore_exiter(rt, tmp_path)
        assert isinstance(loaded, RemoteVm)  # its vCPUs and work device ran in a VM process
    finally:
        await rt.aclose()
