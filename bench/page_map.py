"""State-file size and codec cost of the page-map manifest (state format 1.1.0, issue 10).

For a guest of ``--guest-gib`` (32 by default; 4 with ``--quick``) and three
dirty patterns (every other page: the most extents; random half of the
pages: the least compressible bitmap; contiguous: a plain Full), prints the
state-file size and the median encode and decode times, plus the size the
1.0.0 extent-list form would have needed (computed from its per-extent cost
on a sample, since it cannot be encoded past the 10 MB limit).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import _common
import attrs
import numpy as np

from squibd.snapshot.codec import encode_body
from squibd.snapshot.envelope import STATE_SIZE_LIMIT, decode_state, encode_state
from squibd.snapshot.manifest import (
    DEFAULT_CHUNK_SIZE,
    Extent,
    MemoryManifest,
    encode_page_map,
    page_map_runs,
    page_map_windows,
)
from squibd.snapshot.minimal import minimal_x86_state, minimal_x86_vcpu
from squibd.vm.memory import x86_layout

PAGE = 4096


def _manifest(written: np.ndarray[Any, np.dtype[np.bool_]], size: int) -> MemoryManifest:
    probe = MemoryManifest(
        page_size=PAGE, regions=x86_layout(size), kind="Full", file_size=size,
        pair_id="bench", parent_pair_id=None, extents=(), digest_algorithm="xxh3-64",
        chunk_size=DEFAULT_CHUNK_SIZE, digests=b"", page_map=encode_page_map(written),
    )  # fmt: skip
    return attrs.evolve(probe, digests=os.urandom(8 * page_map_windows(probe)))


def _list_form_bytes(manifest: MemoryManifest) -> int:
    """The 1.0.0 form's body size: measured on up to 4096 extents, scaled by the count."""
    offsets, lengths = page_map_runs(manifest, windows=False)
    pieces = page_map_runs(manifest, windows=True)[0].size
    sample = min(offsets.size, 4096)
    extents = tuple(Extent(int(o), int(n)) for o, n in zip(offsets[:sample], lengths[:sample],
                                                             strict=True))  # fmt: skip
    small = attrs.evolve(manifest, extents=extents, page_map=None, digests=b"")
    empty = attrs.evolve(small, extents=())
    state = minimal_x86_state(small, (minimal_x86_vcpu(rip=0x1000),))
    per_extent = (len(encode_body(state)) - len(encode_body(attrs.evolve(state, memory=empty))))
    return int(per_extent / max(sample, 1) * offsets.size) + 8 * pieces


def main(args: argparse.Namespace) -> dict[str, Any]:
    gib = 4 if args.quick else args.guest_gib
    size = gib * _common.GIB
    pages = size // PAGE
    patterns = {
        "every_other_page": np.arange(pages) % 2 == 0,
        "random_half": np.random.default_rng(10).random(pages) < 0.5,
        "contiguous": np.ones(pages, dtype=bool),
    }
    result: dict[str, Any] = {"guest_gib": gib, "state_size_limit": STATE_SIZE_LIMIT}
    for name, written in patterns.items():
        manifest = _manifest(written, size)
        state = minimal_x86_state(manifest, (minimal_x86_vcpu(rip=0x1000),))
        data = encode_state(state)
        encode = _common.measure(lambda s=state: encode_state(s), reps=args.reps)
        decode = _common.measure(lambda d=data: decode_state(d), reps=args.reps)
        result[name] = {
            "state_file_bytes": len(data),
            "list_form_bytes_1_0_0": _list_form_bytes(manifest),
            "encode_ms": encode.scaled(1000),
            "decode_ms": decode.scaled(1000),
        }
    return result


def _extra(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--guest-gib", type=int, default=32, help="guest size (default 32)")


if __name__ == "__main__":
    _common.run_bench("page_map", main, _common.parse_args(__doc__ or "", extra=_extra))
