"""``squibd --rebase-snapshot``: merge a Diff chain onto its Full, offline.

Usage::

    squibd --rebase-snapshot --base BASE.snap --diff D1.snap [--diff D2.snap ...]
           --output OUT.snap [--output-mem-file-path OUT.mem]
           [--base-mem-file-path B.mem] [--diff-mem-file-path D1.mem ...]

(The ``--*-memory-file`` spellings of earlier versions are kept as aliases.)
           [--verify size|full] [--json]

Memory files default to the state path with ``.snap`` replaced by ``.mem``.
Exit codes: 0 done, 1 the rebase failed (the message names the error kind),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from squibd.snapshot.errors import SnapshotError
from squibd.snapshot.rebase import rebase

__all__ = ["main"]

#: Exit codes (argparse itself exits 2 on usage errors).
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squibd --rebase-snapshot",
        description="Merge Diff snapshots onto their parent Full snapshot into a new Full pair.",
    )
    parser.add_argument("--rebase-snapshot", action="store_true", required=True,
                        help="select this mode")
    parser.add_argument("--base", required=True, metavar="BASE.snap",
                        help="the Full state file the chain starts from")
    parser.add_argument("--diff", required=True, action="append", metavar="DIFF.snap",
                        help="a Diff state file; repeat in checkpoint order")
    parser.add_argument("--output", required=True, metavar="OUT.snap",
                        help="the state file of the merged Full pair")
    parser.add_argument("--output-mem-file-path", "--output-memory-file",
                        dest="output_memory_file", metavar="OUT.mem",
                        help="its memory file (default: OUT.snap with .snap -> .mem)")
    parser.add_argument("--base-mem-file-path", "--base-memory-file",
                        dest="base_memory_file", metavar="BASE.mem",
                        help="the base's memory file (default: inferred)")
    parser.add_argument("--diff-mem-file-path", "--diff-memory-file", action="append",
                        dest="diff_memory_file", metavar="DIFF.mem",
                        help="the memory file of each --diff, in the same order")
    parser.add_argument("--verify", choices=("size", "full"), default="size",
                        help="how to check the inputs first (default: size)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str]) -> int:
    """Run the rebase with ``argv`` (including ``--rebase-snapshot``); returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    diff_mems = args.diff_memory_file
    if diff_mems is not None and len(diff_mems) != len(args.diff):
        parser.error("give one --diff-memory-file per --diff, or none")
    # Relative paths are the caller's, resolved against its working directory (as squibctl).
    def absolute(path: str | None) -> str | None:
        return None if path is None else os.path.abspath(path)

    if diff_mems is not None:
        diff_mems = [os.path.abspath(path) for path in diff_mems]
    try:
        manifest = rebase(
            os.path.abspath(args.base),
            [os.path.abspath(path) for path in args.diff],
            os.path.abspath(args.output),
            absolute(args.output_memory_file),
            base_mem=absolute(args.base_memory_file),
            diff_mems=diff_mems,
            verify_mode=args.verify,
        )
    except SnapshotError as error:
        print(f"squibd --rebase-snapshot: {error.kind}: {error}", file=sys.stderr)
        return EXIT_FAILED
    summary = {
        "output": args.output,
        "pair_id": manifest.pair_id,
        "file_size": manifest.file_size,
        "bytes_written": manifest.bytes_written,
        "extents": len(manifest.extents),
        "diffs_merged": len(args.diff),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(
            f"rebased {len(args.diff)} diff(s) onto {args.base} -> {args.output} "
            f"(pair {manifest.pair_id}, {manifest.bytes_written} of {manifest.file_size} bytes "
            f"in {len(manifest.extents)} extents)"
        )
    return EXIT_OK
