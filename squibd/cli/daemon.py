"""The ``squibd`` entry point: the daemon, plus offline tools.

Offline modes are picked by their flag and handled by their own module,
each exposing ``main(argv) -> int``:

- ``--describe-snapshot PATH``  -> ``squibd.cli.describe``
- ``--rebase-snapshot ...``     -> ``squibd.cli.rebase``
- ``--page-server ...``         -> ``squibd.cli.pageserver``
- ``--firecracker-api-socket``  -> ``squibd.cli.firecracker`` (an empty VM slot
  serving Firecracker's REST API only)

Anything else starts the daemon (``squibd.cli.serve``).
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main"]

_OFFLINE_MODES = {
    "--describe-snapshot": "squibd.cli.describe",
    "--rebase-snapshot": "squibd.cli.rebase",
    "--page-server": "squibd.cli.pageserver",
    "--firecracker-api-socket": "squibd.cli.firecracker",
    "--vm-process": "squibd.vmm.process",
}


def main(argv: list[str] | None = None) -> int:
    """Run squibd with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    module_name = "squibd.cli.serve"
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in _OFFLINE_MODES:
            module_name = _OFFLINE_MODES[flag]
            break
    module = importlib.import_module(module_name)
    code: int = module.main(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
