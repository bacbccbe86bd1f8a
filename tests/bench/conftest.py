"""tests/bench: put the repository's bench/ directory on sys.path so tests import the helpers."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
# Appended, not prepended: bench/ holds modules named like common words (rpc, uffd,
# digest) that must never shadow anything else the suite imports.
if str(BENCH_DIR) not in sys.path:
    sys.path.append(str(BENCH_DIR))
