"""The snapshot-format demo of issue 2 (``make demo-format``; no daemon, no KVM).

Builds a state (2 vCPUs, a few devices, patterned memory), writes a real
snapshot pair through :class:`~squibd.snapshot.commit.PairTransaction`,
describes it, corrupts a copy of the state file and describes that too.
Run from the repository root: ``python scripts/demo_format.py [--dir DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from typing import Final

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from squibd.snapshot.commit import PairTransaction
from squibd.snapshot.compat import MIB
from squibd.snapshot.describe import describe_snapshot, render_text
from squibd.snapshot.envelope import encode_state
from squibd.snapshot.pairing import PAIR_XATTR
from tests.snapshot._states import pattern_memory, sample_manifest, sample_x86_state

#: Guest memory of the demo VM.
DEMO_MEM_MIB: Final = 16
DEMO_VCPUS: Final = 2


def _banner(text: str) -> None:
    print(f"\n=== {text} ===")


def write_demo_pair(directory: str) -> tuple[str, str]:
    """Write a real snapshot pair (2 vCPUs, devices, patterned memory) into ``directory``."""
    snap, mem = os.path.join(directory, "demo.snap"), os.path.join(directory, "demo.mem")
    memory = pattern_memory(DEMO_MEM_MIB * MIB)
    pair_id = str(uuid.uuid4())
    state = sample_x86_state(
        DEMO_VCPUS, DEMO_MEM_MIB,
        manifest=sample_manifest(DEMO_MEM_MIB, memory=memory, pair_id=pair_id),
    )  # fmt: skip
    with PairTransaction(snap, mem) as tx:
        view = memoryview(memory)
        while view:
            view = view[os.write(tx.mem_fd, view) :]
        # A filesystem without user xattrs: size and digests still bind the pair.
        with contextlib.suppress(OSError):
            os.setxattr(tx.mem_fd, PAIR_XATTR, pair_id.encode())
        tx.commit(encode_state(state))
    return snap, mem


def main(argv: Sequence[str] | None = None) -> int:
    """Run the format demo; returns 0 when every step behaved as expected."""
    parser = argparse.ArgumentParser(prog="scripts/demo_format.py", description=__doc__)
    parser.add_argument("--dir", help="write the pair here and keep it (default: a temp dir)")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="squibd-demo-")
    os.makedirs(directory, exist_ok=True)
    try:
        _banner(f"writing a snapshot pair into {directory}")
        snap, mem = write_demo_pair(directory)
        print(f"{snap}: {os.path.getsize(snap)} bytes; {mem}: {os.path.getsize(mem)} bytes")
        _banner("describing it (--verify full)")
        good = describe_snapshot(snap, verify="full")
        print(render_text(good))
        _banner("describing a copy with one flipped bit")
        damaged_path = os.path.join(directory, "damaged.snap")
        data = bytearray(open(snap, "rb").read())  # noqa: SIM115 - short-lived read
        data[len(data) // 2] ^= 0x10
        with open(damaged_path, "wb") as out:
            out.write(data)
        damaged = describe_snapshot(damaged_path, memory_file=mem)
        print(render_text(damaged))
        as_expected = good.ok and not damaged.ok and damaged.crc_ok is False
        _banner("result: " + ("as expected" if as_expected else "UNEXPECTED"))
        return 0 if as_expected else 1
    finally:
        if args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
