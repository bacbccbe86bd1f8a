"""``squibd --describe-snapshot PATH [--json] [--verify MODE] [--memory-file PATH]``.

Prints what a state file holds (and whether its memory file matches). Exit
status: 0 when everything checks out, 1 when the file is missing, damaged,
foreign or mismatched, i.e. not loadable or failing verification (what can be
shown is still shown), and 2 for usage errors (as ``squibctl snapshot
describe``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Final

from ..snapshot.describe import describe_snapshot, render_text

__all__ = ["main"]

EXIT_OK: Final = 0
#: Not loadable: missing, damaged, foreign or mismatched, or verification failed.
EXIT_DAMAGED: Final = 1
#: Usage error (argparse's own usage-error status).
EXIT_USAGE: Final = 2
VERIFY_MODES: Final = ("none", "size", "full")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squibd --describe-snapshot",
        description="Describe a squibd state file and check its memory file.",
    )
    parser.add_argument("--describe-snapshot", dest="path", metavar="PATH", required=True,
                        help="the state file (<id>.snap)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verify", choices=VERIFY_MODES, default="none",
                        help="check the memory file: size (and pair), or full digests")  # fmt: skip
    parser.add_argument(
        "--mem-file-path", "--memory-file", dest="memory_file", metavar="PATH", default=None,
        help="the memory file (default: PATH with .snap replaced by .mem)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the describe tool; returns the exit status."""
    arguments = sys.argv[1:] if argv is None else argv
    parser = _parser()
    if "-h" in arguments or "--help" in arguments:  # also right after the mode flag
        parser.print_help()
        return EXIT_OK
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    # Relative paths are the caller's, resolved against its working directory (as squibctl).
    memory_file = None if args.memory_file is None else os.path.abspath(args.memory_file)
    description = describe_snapshot(
        os.path.abspath(args.path), memory_file=memory_file, verify=args.verify
    )
    if args.json:
        print(json.dumps(description.to_json(), sort_keys=True))
    else:
        print(render_text(description))
    return EXIT_OK if description.ok else EXIT_DAMAGED


if __name__ == "__main__":
    sys.exit(main())
