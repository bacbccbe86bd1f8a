"""squibd vs QEMU: durable Full save time and live-save pause (issue 6, BENCH.md vs_qemu_ratio).

Stop-and-copy save: QEMU 7.2 (Debian) with KVM, no NIC, no display, paused
with -S, its RAM a memory-backend-file on /dev/shm prefilled with random
bytes, saved with QMP ``migrate`` to ``fd:`` (the output file passed with
``getfd``), max-bandwidth raised, then fsync'd; against a durable squibd Full
save of a guest with the same amount of random-filled RAM. QEMU refuses a
second migrate from the post-migrate state, so each repetition starts a fresh
QEMU on the same RAM file (its startup is not timed).

Live: QEMU's ``background-snapshot`` capability on a running guest (SeaBIOS
looping with no boot device) reports its downtime; squibd's live Full save of
a running guest reports its pause.

Usage: python bench/vs_qemu.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any

import _common
import _qemu
import _squibd

BENCH = "vs_qemu"
# Issue 6: 1 GiB and 4 GiB guests; --quick keeps the suite near two minutes.
SIZES_MIB = (1024, 4096)
QUICK_SIZES_MIB = (256,)
# Issue 6 targets.
TARGET_SAVE_RATIO = 0.5
RAM_FILE_PREFIX = "/dev/shm/squibd-bench-qemu-ram-"
QMP_SOCKET_NAME = "qmp.sock"
BACKGROUND_SNAPSHOT_CAP = "background-snapshot"


def _ram_file(mem_mib: int) -> str:
    """Create the QEMU RAM file on /dev/shm filled with random bytes."""
    path = f"{RAM_FILE_PREFIX}{os.getpid()}-{mem_mib}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _common.fill_random_fd(fd, mem_mib * _common.MIB)
    finally:
        os.close(fd)
    return path


def _qemu_run(binary: str, ram: str, mem_mib: int, directory: str, *,
              background: bool) -> tuple[float, dict[str, Any]]:
    """Start QEMU, migrate to a file once, return (wall seconds, query-migrate info)."""
    out = os.path.join(directory, "qemu.state")
    qemu = _qemu.QemuProcess(binary=binary, mem_path=ram, mem_mib=mem_mib,
                             qmp_path=os.path.join(directory, QMP_SOCKET_NAME),
                             paused=not background)
    try:
        with qemu:
            assert qemu.qmp is not None
            _qemu.raise_bandwidth(qemu.qmp)
            if background:
                qemu.qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": BACKGROUND_SNAPSHOT_CAP, "state": True}]})
            with _common.Stopwatch() as sw:
                info = _qemu.migrate_to_file(qemu.qmp, out)
            info["file_bytes"] = os.path.getsize(out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
    return sw.seconds, info


def _qemu_series(binary: str, mem_mib: int, reps: int, *,
                 background: bool) -> dict[str, Any]:
    """Warm-up plus ``reps`` QEMU saves of a fresh QEMU on one random RAM file."""
    ram = _ram_file(mem_mib)
    try:
        with _common.scratch_dir() as directory:
            walls: list[float] = []
            infos: list[dict[str, Any]] = []
            for i in range(reps + _common.DEFAULT_WARMUP):
                wall, info = _qemu_run(binary, ram, mem_mib, directory, background=background)
                if i >= _common.DEFAULT_WARMUP:
                    walls.append(wall)
                    infos.append(info)
    finally:
        os.unlink(ram)
    result: dict[str, Any] = {
        "save_s": _common.summarize(walls).to_dict(),
        "qemu_total_time_ms": _common.summarize(
            [float(i.get("total-time", 0)) for i in infos]).to_dict(digits=1),
        "qemu_downtime_ms": _common.summarize(
            [float(i.get("downtime", 0)) for i in infos]).to_dict(digits=1),
        "file_bytes": infos[-1]["file_bytes"],
    }
    return result


def _squibd_save(mem_mib: int, reps: int) -> dict[str, Any]:
    try:
        stats, path = _squibd.full_save(mem_mib, reps)
    except _squibd.SquibdUnavailable as exc:
        return {"error": f"squibd save unavailable: {exc}"}
    return {"save_s": stats.to_dict(), "path": path}


def _squibd_live(mem_mib: int, reps: int) -> dict[str, Any]:
    try:
        stats, path = _squibd.live_pause(mem_mib, reps)
    except _squibd.SquibdUnavailable as exc:
        return {"error": f"squibd live save unavailable: {exc}"}
    return {"pause_ms": stats.to_dict(digits=3), "path": path}


def _median(entry: dict[str, Any], key: str) -> float | None:
    value = entry.get(key)
    return float(value["median"]) if isinstance(value, dict) else None


def _one_size(binary: str, mem_mib: int, reps: int) -> dict[str, Any]:
    _common.log(f"vs_qemu {mem_mib} MiB: QEMU migrate of a paused VM")
    qemu_save = _qemu_series(binary, mem_mib, reps, background=False)
    _common.log(f"vs_qemu {mem_mib} MiB: squibd Full save")
    squibd_save = _squibd_save(mem_mib, reps)
    _common.log(f"vs_qemu {mem_mib} MiB: QEMU background-snapshot")
    qemu_bg = _qemu_series(binary, mem_mib, reps, background=True)
    _common.log(f"vs_qemu {mem_mib} MiB: squibd live Full save")
    squibd_live = _squibd_live(mem_mib, reps)
    save_ratio = _common.ratio(_median(squibd_save, "save_s"), _median(qemu_save, "save_s"))
    pause_ratio = _common.ratio(_median(squibd_live, "pause_ms"),
                                _median(qemu_bg, "qemu_downtime_ms"))
    return {
        "mem_mib": mem_mib,
        "qemu_save": qemu_save,
        "squibd_save": squibd_save,
        "vs_qemu_ratio": save_ratio,
        "save_target_met": None if save_ratio is None else save_ratio <= TARGET_SAVE_RATIO,
        "qemu_background_snapshot": {
            "downtime_ms": qemu_bg["qemu_downtime_ms"],
            "total_s": qemu_bg["save_s"],
        },
        "squibd_live": squibd_live,
        "pause_ratio": pause_ratio,
        "pause_below_qemu": None if pause_ratio is None else pause_ratio < 1.0,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison for every size; the returned dict is the JSON line."""
    if not _common.kvm_available():
        _common.skip(BENCH, "/dev/kvm is not available")
    try:
        binary = _qemu.ensure_qemu()
    except _qemu.QemuUnavailable as exc:
        _common.skip(BENCH, f"QEMU unavailable: {exc}")
    sizes = QUICK_SIZES_MIB if args.quick else SIZES_MIB
    results = [_one_size(binary, mib, args.reps) for mib in sizes]
    by_size = {r["mem_mib"]: r for r in results}
    largest = by_size[max(by_size)]
    return {
        "qemu": _qemu.qemu_version(binary),
        "reps": args.reps,
        "sizes": results,
        # Headline figures (BENCH.md vs_qemu_ratio) at the largest size measured.
        "vs_qemu_ratio": largest["vs_qemu_ratio"],
        "pause_ratio": largest["pause_ratio"],
        "headline_mem_mib": largest["mem_mib"],
    }


if __name__ == "__main__":
    _common.run_bench(BENCH, main, _common.parse_args(__doc__ or ""))
