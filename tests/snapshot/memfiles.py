"""Test helpers for memory files, for any test in the project.

- :func:`assert_same_content`: two memory files hold the same bytes (holes
  read as zeros; where the data physically lives does not matter).
- :func:`assert_holes_match`: a file's ``SEEK_DATA`` extents equal the
  given extents (coalesced), i.e. it holds data exactly there.
- :func:`coalesce`: merge adjacent extents (manifests never merge across a
  region boundary; ``SEEK_DATA`` does).
- :func:`small_tmpfs`: a tmpfs of a given size (ENOSPC on demand; root only).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

from squibd.snapshot.manifest import Extent
from squibd.snapshot.verify import data_extents, first_difference

__all__ = ["assert_holes_match", "assert_same_content", "coalesce", "small_tmpfs"]


def coalesce(extents: Iterable[Extent]) -> list[Extent]:
    """Sorted extents with adjacent or overlapping ones merged."""
    merged: list[Extent] = []
    for extent in sorted(extents, key=lambda e: e.offset):
        if merged and extent.offset <= merged[-1].end:
            last = merged.pop()
            extent = Extent(last.offset, max(last.end, extent.end) - last.offset)
        merged.append(extent)
    return merged


def assert_same_content(path_a: str | os.PathLike[str], path_b: str | os.PathLike[str]) -> None:
    """Fail naming the first differing offset if the files' contents differ."""
    offset = first_difference(os.fspath(path_a), os.fspath(path_b))
    assert offset is None, f"{path_a} and {path_b} differ first at offset {offset} ({offset:#x})"


def assert_holes_match(path: str | os.PathLike[str], extents: Iterable[Extent]) -> None:
    """Fail unless ``path`` holds data exactly in ``extents`` (per SEEK_DATA/SEEK_HOLE)."""
    found = data_extents(os.fspath(path))
    expected = coalesce(extents)
    assert found == expected, f"data extents {found} != expected {expected}"


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (mount syntax, e.g. ``"2m"``) at ``tmp_path/small``."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                   check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)
