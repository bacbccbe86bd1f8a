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
a running guest (the built-in ``counter`` program, which dirties almost
nothing, like the idle BIOS) reports its pause.

The machine is shared and noisy, so squibd and QEMU repetitions are
interleaved (QEMU first on even repetitions, squibd first on odd ones) against
one long-lived squibd VM, paused while QEMU runs; besides the ratio of medians
the result carries the median of the per-pair ratios.

Usage: python bench/vs_qemu.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Awaitable, Callable
from typing import Any

import _common
import _qemu
import _squibd
import attrs
import trio

BENCH = "vs_qemu"
# Issue 6: 1 GiB and 4 GiB guests; --quick keeps the suite near two minutes.
SIZES_MIB = (1024, 4096)
QUICK_SIZES_MIB = (128,)
# Issue 6 targets.
TARGET_SAVE_RATIO = 0.5
RAM_FILE_PREFIX = "/dev/shm/squibd-bench-qemu-ram-"
QMP_SOCKET_NAME = "qmp.sock"
BACKGROUND_SNAPSHOT_CAP = "background-snapshot"
_MS_PER_S = 1000.0


def _ram_file(mem_mib: int) -> str:
    """Create the QEMU RAM file on /dev/shm filled with random bytes."""
    path = f"{RAM_FILE_PREFIX}{os.getpid()}-{mem_mib}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _common.fill_random_fd(fd, mem_mib * _common.MIB)
    except BaseException:
        os.unlink(path)  # e.g. ENOSPC on /dev/shm: leave nothing behind
        raise
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


@attrs.define(eq=False)
class _Pairs:
    """Interleaved measurements of squibd and QEMU (order alternates per repetition)."""

    squibd: list[float] = attrs.field(factory=list)
    qemu: list[float] = attrs.field(factory=list)
    qemu_infos: list[dict[str, Any]] = attrs.field(factory=list)
    notes: list[Any] = attrs.field(factory=list)

    def paired_ratio(self) -> dict[str, float | int] | None:
        """Median/min/max of squibd_i / qemu_i over the repetitions (noise shared per pair)."""
        if not self.squibd or len(self.squibd) != len(self.qemu):
            return None
        ratios = [a / b for a, b in zip(self.squibd, self.qemu, strict=True) if b > 0]
        return _common.summarize(ratios).to_dict(digits=4) if ratios else None


def _qemu_summary(infos: list[dict[str, Any]], walls: list[float]) -> dict[str, Any]:
    return {
        "save_s": _common.summarize(walls).to_dict(),
        "qemu_total_time_ms": _common.summarize(
            [float(i.get("total-time", 0)) for i in infos]).to_dict(digits=1),
        "qemu_downtime_ms": _common.summarize(
            [float(i.get("downtime", 0)) for i in infos]).to_dict(digits=1),
        "file_bytes": infos[-1]["file_bytes"],
    }


async def _qemu_once(binary: str, ram: str, mem_mib: int, directory: str, *,
                     background: bool) -> tuple[float, dict[str, Any]]:
    return await trio.to_thread.run_sync(
        lambda: _qemu_run(binary, ram, mem_mib, directory, background=background))


async def _interleaved(reps: int, qemu: Callable[[], Awaitable[tuple[float, dict[str, Any]]]],
                       squibd: Callable[[], Awaitable[tuple[float, Any]]]) -> _Pairs:
    """Warm-up then ``reps`` pairs, QEMU first on even repetitions, squibd first on odd ones."""
    pairs = _Pairs()
    for i in range(reps + _common.DEFAULT_WARMUP):
        if i % 2 == 0:
            q_value, q_info = await qemu()
            s_value, s_note = await squibd()
        else:
            s_value, s_note = await squibd()
            q_value, q_info = await qemu()
        if i >= _common.DEFAULT_WARMUP:
            pairs.qemu.append(q_value)
            pairs.qemu_infos.append(q_info)
            pairs.squibd.append(s_value)
            pairs.notes.append(s_note)
    return pairs


async def _compare_runtime(binary: str, ram: str, mem_mib: int, reps: int,
                           directory: str) -> dict[str, Any]:
    """Both comparisons against one long-lived squibd VM, interleaved with fresh QEMUs."""
    async with _squibd.bench_vm(mem_mib, directory) as vm:
        _common.log(f"vs_qemu {mem_mib} MiB: stop-and-copy save, squibd vs QEMU migrate")

        async def squibd_save() -> tuple[float, Any]:
            return await vm.save_full(), None

        async def qemu_save() -> tuple[float, dict[str, Any]]:
            return await _qemu_once(binary, ram, mem_mib, directory, background=False)

        saves = await _interleaved(reps, qemu_save, squibd_save)
        _common.log(f"vs_qemu {mem_mib} MiB: live save pause vs QEMU background-snapshot")

        async def squibd_live() -> tuple[float, Any]:
            result = await vm.save_live()
            return float(result.pause_ms), (int(result.passes),
                                            float(result.duration_ms) / _MS_PER_S)

        async def qemu_background() -> tuple[float, dict[str, Any]]:
            wall, info = await _qemu_once(binary, ram, mem_mib, directory, background=True)
            info["wall_s"] = wall
            return float(info.get("downtime", 0)), info

        lives = await _interleaved(reps, qemu_background, squibd_live)
    return {
        "squibd_path": _squibd.PATH_RUNTIME,
        "qemu_save": _qemu_summary(saves.qemu_infos, saves.qemu),
        "squibd_save": {"save_s": _common.summarize(saves.squibd).to_dict()},
        "paired_save_ratio": saves.paired_ratio(),
        "qemu_background_snapshot": {
            "downtime_ms": _common.summarize(lives.qemu).to_dict(digits=1),
            "total_s": _common.summarize(
                [float(i["wall_s"]) for i in lives.qemu_infos]).to_dict(),
        },
        "squibd_live": {"pause_ms": _common.summarize(lives.squibd).to_dict(digits=3),
                        "save_s": _common.summarize([n[1] for n in lives.notes]).to_dict(),
                        "passes": [n[0] for n in lives.notes], "guest": vm.program},
    }


async def _compare_fallback(binary: str, ram: str, mem_mib: int, reps: int, directory: str,
                            why: str) -> dict[str, Any]:
    """No runtime: QEMU alone, then the memory-writer path (not interleaved)."""
    _common.log(f"vs_qemu {mem_mib} MiB: runtime unavailable ({why}); memwriter path")
    walls: list[float] = []
    infos: list[dict[str, Any]] = []
    for i in range(reps + _common.DEFAULT_WARMUP):
        wall, info = await _qemu_once(binary, ram, mem_mib, directory, background=False)
        if i >= _common.DEFAULT_WARMUP:
            walls.append(wall)
            infos.append(info)
    out: dict[str, Any] = {"qemu_save": _qemu_summary(infos, walls),
                           "squibd_live": {"error": f"squibd live save unavailable: {why}"}}
    try:
        stats, path = await trio.to_thread.run_sync(lambda: _squibd.full_save(mem_mib, reps))
    except _squibd.SquibdUnavailable as exc:
        out["squibd_save"] = {"error": f"squibd save unavailable: {exc}"}
    else:
        out["squibd_save"] = {"save_s": stats.to_dict()}
        out["squibd_path"] = path
    return out


def _median(entry: dict[str, Any], *keys: str) -> float | None:
    value: Any = entry
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return float(value["median"]) if isinstance(value, dict) and "median" in value else None


async def _one_size(binary: str, mem_mib: int, reps: int) -> dict[str, Any]:
    _common.log(f"vs_qemu {mem_mib} MiB: filling the QEMU RAM file with random bytes")
    ram = await trio.to_thread.run_sync(_ram_file, mem_mib)
    try:
        with _common.scratch_dir() as directory:
            try:
                out = await _compare_runtime(binary, ram, mem_mib, reps, directory)
            except _squibd.SquibdUnavailable as exc:
                out = await _compare_fallback(binary, ram, mem_mib, reps, directory, str(exc))
    finally:
        os.unlink(ram)
    save_ratio = _common.ratio(_median(out, "squibd_save", "save_s"),
                               _median(out, "qemu_save", "save_s"))
    pause_ratio = _common.ratio(_median(out, "squibd_live", "pause_ms"),
                                _median(out, "qemu_background_snapshot", "downtime_ms"))
    return {
        "mem_mib": mem_mib,
        **out,
        "vs_qemu_ratio": save_ratio,
        "save_target_met": None if save_ratio is None else save_ratio <= TARGET_SAVE_RATIO,
        "pause_ratio": pause_ratio,
        "pause_below_qemu": None if pause_ratio is None else pause_ratio < 1.0,
    }


async def _all_sizes(binary: str, sizes: tuple[int, ...], reps: int) -> list[dict[str, Any]]:
    return [await _one_size(binary, mib, reps) for mib in sizes]


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Run the comparison for every size; the returned dict is the JSON line."""
    if not _common.kvm_available():
        _common.skip(BENCH, "/dev/kvm is not available")
    try:
        binary = _qemu.ensure_qemu()
    except _qemu.QemuUnavailable as exc:
        _common.skip(BENCH, f"QEMU unavailable: {exc}")
    sizes = QUICK_SIZES_MIB if args.quick else SIZES_MIB
    results = trio.run(_all_sizes, binary, sizes, args.reps)
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
