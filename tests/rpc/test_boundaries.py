"""ARCHITECTURE: rpc/ is sans-IO: it imports neither trio nor socket, nor squibd's other parts."""

from __future__ import annotations

import json
import subprocess
import sys


def test_rpc_imports_no_io_and_no_other_part() -> None:
    probe = (
        "import sys, json; import squibd.rpc; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('trio', 'socket', 'squibd'))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout  # fmt: skip
    loaded = json.loads(out)
    assert "trio" not in loaded and "socket" not in loaded
    assert all(m == "squibd" or m.startswith("squibd.rpc") for m in loaded), loaded
