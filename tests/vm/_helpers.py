"""Helpers shared by the VM runtime tests (no sleeps: guest heartbeats synchronize)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import trio

from squibd.snapshot.rebase import rebase
from squibd.vm.machine import Vm

#: Generous bound for a guest to show progress on a noisy, shared host.
PROGRESS_TIMEOUT_S: Final = 60.0
_COMPARE_BLOCK: Final = 4 * 1024 * 1024


async def wait_progress_beyond(vm: Vm, floor: list[int]) -> list[int]:
    """Wait (by heartbeats) until every vCPU's counter exceeds ``floor``; return them."""
    with trio.fail_after(PROGRESS_TIMEOUT_S):
        while True:
            progress = vm.guest_progress()
            if all(now > before for now, before in zip(progress, floor, strict=True)):
                return progress
            await vm.wait_heartbeats(1)


def first_memory_difference(path: str, vm: Vm) -> int | None:
    """File offset of the first byte where ``path`` differs from ``vm``'s RAM (None: equal).

    Holes read as zeros; the file's regions are laid out as the VM's.
    """
    with open(path, "rb") as file:
        for region in vm.memory.regions:
            offset = 0
            while offset < region.size:
                length = min(_COMPARE_BLOCK, region.size - offset)
                data = os.pread(file.fileno(), length, region.file_offset + offset)
                if data != region.view[offset : offset + length]:
                    for i, byte in enumerate(data):
                        if byte != region.view[offset + i]:
                            return region.file_offset + offset + i
                    return region.file_offset + offset + len(data)
                offset += length
    return None



def rebase_full_and_diff(directory: Path) -> str:
    """Rebase ``f.snap`` + ``d.snap`` (and their ``.mem``) into ``r.snap``; return ``r.mem``."""
    rebase(
        str(directory / "f.snap"), [str(directory / "d.snap")], str(directory / "r.snap"),
        str(directory / "r.mem"), base_mem=str(directory / "f.mem"),
        diff_mems=[str(directory / "d.mem")],
    )  # fmt: skip
    return str(directory / "r.mem")
