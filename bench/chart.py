"""Chart pause and save time against memory size from bench/results.json.

Two panels, each a line per system: the VM pause (ms, log scale) and the
durable save time (s), both against guest memory (GiB), for squibd live,
squibd stop-and-copy and QEMU (migrate of a paused VM; background-snapshot).
Figures come from the ``live_pause``, ``full_save`` and ``vs_qemu`` results;
a series with no figures is left out, and with no figures at all the chart is
skipped. Also writes the same figures as a Markdown table (bench/results.md).

Needs matplotlib (the ``bench`` extra: ``pip install -e '.[bench]'``).

Usage: python bench/chart.py [--results PATH] [--output PNG] [--table MD]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import _common

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = BENCH_DIR / "results.json"
DEFAULT_PNG = BENCH_DIR / "results.png"
DEFAULT_TABLE = BENCH_DIR / "results.md"
MS_PER_S = 1000.0
MIB_PER_GIB = 1024.0
FIG_SIZE_IN = (11.0, 4.5)
FIG_DPI = 110

# One source of a series: (bench, keys to try in each per-size entry, scale to the
# panel's unit). Keys are dotted paths; a value is a number or a Stats dict
# ({"median", ...}). The first source that yields a size wins for that size.
Source = tuple[str, tuple[str, ...], float]

# vs_qemu comes first for squibd: its figures share the run and the workload
# (random-filled RAM, an idle guest) with the QEMU figures.
PAUSE_SERIES: dict[str, tuple[Source, ...]] = {
    "squibd live (idle guest)": (
        ("vs_qemu", ("squibd_live.pause_ms",), 1.0),
    ),
    "squibd live (memwriter guest)": (
        ("live_pause", ("live_pause_ms", "live.pause_ms", "live_ms"), 1.0),
    ),
    "squibd stop-and-copy": (
        # A paused VM's stop-and-copy save keeps it paused for the whole save.
        ("vs_qemu", ("squibd_save.save_s",), MS_PER_S),
        ("live_pause", ("stop_copy_pause_ms", "stop_and_copy_pause_ms", "stop_copy.pause_ms"),
         1.0),
        ("full_save", ("pause_ms",), 1.0),
    ),
    "QEMU background-snapshot": (
        ("vs_qemu", ("qemu_background_snapshot.downtime_ms",), 1.0),
    ),
    "QEMU migrate (paused VM)": (
        ("vs_qemu", ("qemu_save.save_s",), MS_PER_S),
    ),
}
SAVE_SERIES: dict[str, tuple[Source, ...]] = {
    "squibd live (idle guest)": (
        ("vs_qemu", ("squibd_live.save_s",), 1.0),
    ),
    "squibd live (memwriter guest)": (
        ("live_pause", ("live_save_s", "live.save_s", "live_duration_s"), 1.0),
    ),
    "squibd stop-and-copy": (
        ("vs_qemu", ("squibd_save.save_s",), 1.0),
        ("full_save", ("full_save_s", "squibd_s", "save_s"), 1.0),
        ("live_pause", ("stop_copy_save_s",), 1.0),
    ),
    "QEMU migrate (paused VM)": (
        ("vs_qemu", ("qemu_save.save_s",), 1.0),
    ),
    "QEMU background-snapshot": (
        ("vs_qemu", ("qemu_background_snapshot.total_s",), 1.0),
    ),
}
# One colour and line style per system, the same in both panels (matplotlib tab10).
STYLES: dict[str, tuple[str, str]] = {
    "squibd live (idle guest)": ("tab:blue", "-"),
    "squibd live (memwriter guest)": ("tab:purple", "-"),
    "squibd stop-and-copy": ("tab:orange", "-"),
    "QEMU migrate (paused VM)": ("tab:red", "--"),
    "QEMU background-snapshot": ("tab:green", "--"),
}
SIZE_KEYS_MIB = ("mem_mib", "mem_size_mib", "size_mib")
SIZE_KEYS_GIB = ("mem_gib", "size_gib")

Series = dict[str, dict[float, float]]  # label -> {GiB: value}


def _lookup(entry: dict[str, Any], dotted: str) -> float | None:
    value: Any = entry
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if isinstance(value, dict):
        value = value.get("median")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _size_gib(entry: dict[str, Any]) -> float | None:
    for key in SIZE_KEYS_MIB:
        if isinstance(entry.get(key), int | float):
            return float(entry[key]) / MIB_PER_GIB
    for key in SIZE_KEYS_GIB:
        if isinstance(entry.get(key), int | float):
            return float(entry[key])
    return None


def _entries(result: dict[str, Any]) -> Iterable[dict[str, Any]]:
    """Per-size entries of a bench result: items of any list of dicts that name a size."""
    if _size_gib(result) is not None:
        yield result
    for value in result.values():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict) and _size_gib(item) is not None:
                    yield item


def collect(benches: dict[str, Any], spec: dict[str, tuple[Source, ...]]) -> Series:
    """Points of every series in ``spec`` found in the ``benches`` results."""
    series: Series = {}
    for label, sources in spec.items():
        points: dict[float, float] = {}
        for bench, keys, scale in sources:
            result = benches.get(bench)
            if not isinstance(result, dict) or result.get("_status", "ok") != "ok":
                continue
            for entry in _entries(result):
                size = _size_gib(entry)
                if size is None or size in points:
                    continue
                for key in keys:
                    value = _lookup(entry, key)
                    if value is not None:
                        points[size] = value * scale
                        break
        if points:
            series[label] = dict(sorted(points.items()))
    return series


def markdown_table(pause: Series, save: Series, header: str) -> str:
    """The figures as a Markdown table (one row per series and size)."""
    lines = [header, "", "| system | memory (GiB) | pause (ms) | save (s) |",
             "|---|---:|---:|---:|"]
    for label in dict.fromkeys([*pause, *save]):
        sizes = sorted(set(pause.get(label, {})) | set(save.get(label, {})))
        for size in sizes:
            p = pause.get(label, {}).get(size)
            s = save.get(label, {}).get(size)
            lines.append(f"| {label} | {size:g} | {'' if p is None else f'{p:.1f}'} | "
                         f"{'' if s is None else f'{s:.3f}'} |")
    return "\n".join(lines) + "\n"


def draw(pause: Series, save: Series, title: str, output: Path) -> None:
    """Write the two-panel PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_pause, ax_save) = plt.subplots(1, 2, figsize=FIG_SIZE_IN)
    try:
        for ax, series, ylabel in ((ax_pause, pause, "VM pause (ms, log)"),
                                   (ax_save, save, "durable save time (s)")):
            for label, points in series.items():
                color, style = STYLES.get(label, ("tab:gray", ":"))
                ax.plot(list(points), list(points.values()), marker="o", label=label,
                        color=color, linestyle=style)
            ax.set_xlabel("guest memory (GiB)")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            if series:
                ax.legend(fontsize="small")
        if pause:
            ax_pause.set_yscale("log")
        ax_pause.set_title("pause")
        ax_save.set_title("save time")
        fig.suptitle(title, fontsize="small")
        fig.tight_layout()
        fig.savefig(output, dpi=FIG_DPI)
    finally:
        plt.close(fig)


def _title(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    quick = " (--quick)" if results.get("quick") else ""
    return (f"squibd benchmarks{quick}, {results.get('date', '?')}: {m.get('nproc', '?')} CPUs "
            f"{m.get('cpu_model', '?')}, {m.get('memory_gib', '?')} GiB, "
            f"Linux {m.get('kernel', '?')}")


def main(argv: list[str] | None = None) -> int:
    """Draw the chart and table; prints one JSON line; exit status 0 unless the input is bad."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--output", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--table", type=Path, default=DEFAULT_TABLE)
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        _common.emit({"bench": "chart", "error": f"cannot read {args.results}: {exc}"})
        return 1
    benches = results.get("benches", {})
    pause = collect(benches, PAUSE_SERIES)
    save = collect(benches, SAVE_SERIES)
    out: dict[str, Any] = {"bench": "chart", "pause_ms": pause, "save_s": save}
    if not pause and not save:
        _common.skip("chart", "no pause or save figures in the results", results=str(args.results))
    title = _title(results)
    args.table.write_text(markdown_table(pause, save, f"_{title}_"), encoding="utf-8")
    out["table"] = str(args.table)
    try:
        draw(pause, save, title, args.output)
    except ImportError as exc:
        out.update(skipped=True, reason=f"matplotlib unavailable ({exc}); "
                   "install the bench extra: pip install -e '.[bench]'")
    else:
        out["png"] = str(args.output)
    _common.emit(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
