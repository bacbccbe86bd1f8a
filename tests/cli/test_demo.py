"""The demo itself (``make demo``) runs and shows the guest continuing."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.kvm
def test_demo_runs_end_to_end() -> None:
    result = subprocess.run([sys.executable, "-m", "squibd.demo"], capture_output=True,
                            timeout=120, text=True)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "every counter continued past its saved value" in out
    assert "squibd exited with 0" in out
    for timing in ("full_save_ms", "diff_save_ms", "rebase_ms", "load_ms"):
        assert timing in out
