"""``make demo``: for now the snapshot-format demo (issue 2).

The daemon owner replaces this with the full demo (start squibd, run a
guest, Full + Diff snapshot, restore); until then it runs
:mod:`squibd.demo_format`.
"""

from __future__ import annotations

import sys

from .demo_format import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
