"""Run every benchmark and collect their JSON lines into bench/results.json (``make bench``).

Each ``bench/<name>.py`` (helpers ``_*.py``, this runner and ``chart.py``
excepted) runs as its own subprocess with ``--quick`` passed through; its
last stdout line is parsed as JSON. A bench that crashes, times out or prints
no JSON is recorded with its error and the run goes on. The results file
carries the date and the machine (nproc, memory, kernel, CPU model); then
``chart.py`` draws bench/results.png from it.

Usage: python bench/run_all.py [--quick] [--only NAME ...] [--merge] [--output PATH] [--strict]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
DEFAULT_OUTPUT = BENCH_DIR / "results.json"
NOT_BENCHES = frozenset({"run_all", "chart"})
# Run the QEMU comparison last: it installs QEMU and needs the most memory.
RUN_LAST = ("vs_qemu",)
# Per-bench wall-clock limits. BENCH.md: the --quick suite runs in ~2 minutes in
# total; a full bench of 4 GiB guests takes minutes on this 2-core machine.
TIMEOUT_QUICK_S = 600.0
TIMEOUT_FULL_S = 3600.0
STDERR_TAIL_CHARS = 2000
SCHEMA_VERSION = 1


def discover(only: list[str] | None = None) -> list[str]:
    """Names of the benches in bench/, in run order (``only`` filters and keeps its order)."""
    names = sorted(
        p.stem for p in BENCH_DIR.glob("*.py")
        if not p.stem.startswith("_") and p.stem not in NOT_BENCHES
    )
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise SystemExit(f"run_all: no such bench: {', '.join(missing)} (have {names})")
        return list(only)
    head = [n for n in names if n not in RUN_LAST]
    return head + [n for n in RUN_LAST if n in names]


def parse_last_json(stdout: str) -> dict[str, Any]:
    """The JSON object on the last non-empty line of ``stdout``.

    Raises:
        ValueError: no line, or the last line is not a JSON object.
    """
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("bench printed nothing on stdout")
    value = json.loads(lines[-1])
    if not isinstance(value, dict):
        raise ValueError(f"last line is JSON {type(value).__name__}, not an object")
    return value


def run_one(name: str, *, quick: bool, reps: int | None, timeout: float,
            script: Path | None = None) -> dict[str, Any]:
    """Run ``bench/<name>.py`` (or ``script``) and return its JSON result or its failure.

    Every record gets ``_status`` ("ok", "skipped", "error"), ``_wall_s`` and ``_finished``.
    """
    argv = [sys.executable, str(script or BENCH_DIR / f"{name}.py")]
    if quick:
        argv.append("--quick")
    if reps is not None:
        argv += ["--reps", str(reps)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        return {"bench": name, "_status": "error", "error": f"timed out after {timeout:.0f} s",
                "stderr_tail": err[-STDERR_TAIL_CHARS:],
                "_wall_s": round(time.perf_counter() - started, 3)}
    wall = round(time.perf_counter() - started, 3)
    try:
        result = parse_last_json(proc.stdout)
    except ValueError as exc:
        result = {"bench": name, "error": f"no JSON result: {exc}"}
    if proc.returncode != 0 and "error" not in result:
        result["error"] = f"exited with status {proc.returncode}"
    if "error" in result:
        result["_status"] = "error"
        result["returncode"] = proc.returncode
        result["stderr_tail"] = proc.stderr[-STDERR_TAIL_CHARS:]
    elif result.get("skipped"):
        result["_status"] = "skipped"
    else:
        result["_status"] = "ok"
    result["_wall_s"] = wall
    result["_finished"] = _now()
    return result


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def git_commit() -> str | None:
    """HEAD of the repository, if git is there (read-only)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=False)
    except OSError:
        return None
    return out.stdout.strip() or None


def _previous_benches(path: Path) -> dict[str, Any]:
    """The ``benches`` of an existing results file (empty when absent or unreadable)."""
    try:
        benches = json.loads(path.read_text(encoding="utf-8")).get("benches", {})
    except (OSError, ValueError, AttributeError):
        return {}
    return benches if isinstance(benches, dict) else {}


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Write the results file atomically (temp + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def run_chart(results_path: Path, *, timeout: float) -> dict[str, Any]:
    """Run chart.py on the results; its JSON line, or the error."""
    argv = [sys.executable, str(BENCH_DIR / "chart.py"), "--results", str(results_path),
            "--output", str(results_path.with_suffix(".png")),
            "--table", str(results_path.with_suffix(".md"))]
    try:
        proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout, check=False)
        return parse_last_json(proc.stdout)
    except (subprocess.TimeoutExpired, ValueError) as exc:
        return {"error": f"chart.py failed: {exc}"}


def main(argv: list[str] | None = None) -> int:
    """Run the suite; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="pass --quick to every bench")
    parser.add_argument("--reps", type=int, default=None, help="pass --reps N to every bench")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benches")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results file")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other benches' entries already in the results file")
    parser.add_argument("--no-chart", action="store_true", help="do not run chart.py")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when a bench failed (default: record and exit 0)")
    args = parser.parse_args(argv)

    names = discover(args.only)
    timeout = TIMEOUT_QUICK_S if args.quick else TIMEOUT_FULL_S
    results: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "date": _now(),
        "quick": args.quick,
        "git_commit": git_commit(),
        "machine": _common.machine_info(),
        "benches": _previous_benches(args.output) if args.merge else {},
    }
    for name in names:
        print(f"run_all: {name} ...", file=sys.stderr, flush=True)
        record = run_one(name, quick=args.quick, reps=args.reps, timeout=timeout)
        results["benches"][name] = record
        print(f"run_all: {name}: {record['_status']} in {record['_wall_s']} s"
              + (f" ({record['error']})" if "error" in record else ""),
              file=sys.stderr, flush=True)
        write_results(args.output, results)  # keep partial results if interrupted
    write_results(args.output, results)
    chart = {"skipped": True} if args.no_chart else run_chart(args.output, timeout=timeout)
    status = {n: r["_status"] for n, r in results["benches"].items()}
    failed = sorted(n for n, s in status.items() if s == "error")
    _common.emit({"bench": "run_all", "quick": args.quick, "results": str(args.output),
                  "status": status, "failed": failed, "chart": chart})
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
