"""Write protocol/openrpc.json from the API models: ``python scripts/gen_openrpc.py [--check]``.

With ``--check``, exit 1 when the committed file differs (nothing is written).
"""

from __future__ import annotations

import os
import sys

from squibd.api.openrpc import render_document

TARGET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "protocol", "openrpc.json")  # fmt: skip


def main(argv: list[str]) -> int:
    """Generate (or check) the document."""
    text = render_document()
    if "--check" in argv:
        with open(TARGET) as f:
            same = f.read() == text
        print("protocol/openrpc.json is " + ("up to date" if same else "STALE: regenerate it"))
        return 0 if same else 1
    with open(TARGET, "w") as f:
        f.write(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
