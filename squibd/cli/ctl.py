"""The ``squibctl`` client CLI (placeholder until the daemon lands)."""

from __future__ import annotations

import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    print("squibctl: not yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
