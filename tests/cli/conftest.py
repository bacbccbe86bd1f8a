"""Fixtures: a short socket directory (Unix socket paths are limited to 107 bytes)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator

import pytest


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A fresh short directory under /tmp, removed afterwards."""
    path = tempfile.mkdtemp(prefix="sqd-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
