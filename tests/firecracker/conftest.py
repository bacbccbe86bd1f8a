"""Fixtures of the Firecracker interoperability tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from squibd.vm.runtime import Runtime

#: Patient: these tests must never see a quiesce time out on a loaded host.
PATIENT_QUIESCE_TIMEOUT_S = 30.0


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    """A fresh runtime; every VM it still holds is destroyed afterwards."""
    rt = Runtime(quiesce_timeout_s=PATIENT_QUIESCE_TIMEOUT_S)
    try:
        yield rt
    finally:
        await rt.aclose()
