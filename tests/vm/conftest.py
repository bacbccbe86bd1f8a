"""Fixtures of the VM runtime tests: a runtime per test, torn down with its VMs."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from squibd.vm.runtime import Runtime

#: Short enough that a test provoking a quiesce timeout stays fast.
TEST_QUIESCE_TIMEOUT_S = 0.5


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    """A fresh runtime; every VM it still holds is destroyed afterwards."""
    rt = Runtime(quiesce_timeout_s=TEST_QUIESCE_TIMEOUT_S)
    try:
        yield rt
    finally:
        await rt.aclose()
