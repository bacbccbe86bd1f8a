"""bench/run_all.py and bench/chart.py, and a smoke import of every bench module."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import _common
import chart
import pytest
import run_all

BENCH_DIR = Path(_common.__file__).resolve().parent

BENCH_MODULES = sorted(p.stem for p in BENCH_DIR.glob("*.py"))


@pytest.mark.parametrize("name", BENCH_MODULES)
def test_bench_module_imports_without_running(name: str) -> None:
    spec = importlib.util.spec_from_file_location(f"bench_smoke_{name}", BENCH_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the __main__ guard keeps the bench from running
    assert module.__doc__, f"bench/{name}.py needs a module docstring (its --help text)"


def test_discover_lists_benches_without_helpers_and_runs_vs_qemu_last() -> None:
    names = run_all.discover()
    assert not any(n.startswith("_") for n in names)
    assert "run_all" not in names and "chart" not in names
    assert "vs_qemu" in names
    assert names[-1] == "vs_qemu"
    assert run_all.discover(["vs_qemu"]) == ["vs_qemu"]
    with pytest.raises(SystemExit, match="no such bench"):
        run_all.discover(["no_such_bench"])


def test_parse_last_json_takes_the_last_nonblank_line() -> None:
    assert run_all.parse_last_json('chatter\n{"a": 1}\n\n') == {"a": 1}
    with pytest.raises(ValueError, match="nothing"):
        run_all.parse_last_json("\n")
    with pytest.raises(ValueError, match="not an object"):
        run_all.parse_last_json("[1, 2]\n")
    with pytest.raises(ValueError):
        run_all.parse_last_json("not json\n")


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(body, encoding="utf-8")
    return path


def test_run_one_records_ok_skipped_and_passes_quick(tmp_path: Path) -> None:
    ok = _script(tmp_path, "ok", 'import json, sys\nprint(json.dumps({"argv": sys.argv[1:]}))\n')
    rec = run_all.run_one("ok", quick=True, reps=7, timeout=60, script=ok)
    assert rec["_status"] == "ok"
    assert rec["argv"] == ["--quick", "--reps", "7"]
    skip = _script(tmp_path, "sk", 'print(\'{"skipped": true, "reason": "r"}\')\n')
    assert run_all.run_one("sk", quick=False, reps=None, timeout=60,
                           script=skip)["_status"] == "skipped"


def test_run_one_records_a_crash_and_keeps_going(tmp_path: Path) -> None:
    crash = _script(tmp_path, "crash", 'import sys\nsys.stderr.write("boom\\n")\nsys.exit(3)\n')
    rec = run_all.run_one("crash", quick=True, reps=None, timeout=60, script=crash)
    assert rec["_status"] == "error"
    assert rec["returncode"] == 3
    assert "boom" in rec["stderr_tail"]
    assert "no JSON result" in rec["error"]
    bad_exit = _script(tmp_path, "bad", 'import sys\nprint(\'{"x": 1}\')\nsys.exit(1)\n')
    rec = run_all.run_one("bad", quick=True, reps=None, timeout=60, script=bad_exit)
    assert rec["_status"] == "error" and rec["x"] == 1 and "status 1" in rec["error"]


def test_run_one_times_out_a_hung_bench(tmp_path: Path) -> None:
    # The child blocks reading a pipe that never gets data; no sleep involved.
    hung = _script(tmp_path, "hung", "import os\nr, w = os.pipe()\nos.read(r, 1)\n")
    rec = run_all.run_one("hung", quick=True, reps=None, timeout=1.0, script=hung)
    assert rec["_status"] == "error"
    assert "timed out" in rec["error"]


def _stats(median: float) -> dict[str, float]:
    return {"median": median, "min": median, "max": median, "n": 5}


SAMPLE_RESULTS: dict[str, Any] = {
    "date": "2026-11-27T03:00:00+00:00",
    "quick": False,
    "machine": {"nproc": 2, "cpu_model": "X", "memory_gib": 23.5, "kernel": "6.1"},
    "benches": {
        "live_pause": {"_status": "ok", "sizes": [
            {"mem_mib": 1024, "live_pause_ms": _stats(4.0), "stop_copy_pause_ms": _stats(900.0)},
            {"mem_mib": 4096, "live_pause_ms": _stats(5.0), "stop_copy_pause_ms": _stats(3600.0)},
        ]},
        "full_save": {"_status": "error", "error": "x"},
        "vs_qemu": {"_status": "ok", "sizes": [
            {"mem_mib": 1024, "qemu_save": {"save_s": _stats(2.0)},
             "squibd_save": {"save_s": _stats(0.8)},
             "qemu_background_snapshot": {"downtime_ms": _stats(30.0), "total_s": _stats(3.0)},
             "squibd_live": {"pause_ms": _stats(6.0)}},
            {"mem_mib": 4096, "qemu_save": {"save_s": _stats(8.0)},
             "squibd_save": {"error": "unavailable"},
             "qemu_background_snapshot": {"downtime_ms": _stats(40.0), "total_s": _stats(9.0)}},
        ]},
    },
}


def test_chart_collects_series_preferring_the_first_source() -> None:
    pause = chart.collect(SAMPLE_RESULTS["benches"], chart.PAUSE_SERIES)
    save = chart.collect(SAMPLE_RESULTS["benches"], chart.SAVE_SERIES)
    assert pause["squibd live (memwriter guest)"] == {1.0: 4.0, 4.0: 5.0}
    assert pause["squibd live (idle guest)"] == {1.0: 6.0}
    # vs_qemu first; at 4 GiB its squibd save failed, so live_pause fills in.
    assert pause["squibd stop-and-copy"] == {1.0: 800.0, 4.0: 3600.0}
    assert pause["QEMU background-snapshot"] == {1.0: 30.0, 4.0: 40.0}
    assert pause["QEMU migrate (paused VM)"] == {1.0: 2000.0, 4.0: 8000.0}
    # full_save failed and live_pause has no save times: only vs_qemu's 1 GiB point.
    assert save["squibd stop-and-copy"] == {1.0: 0.8}
    assert save["QEMU migrate (paused VM)"] == {1.0: 2.0, 4.0: 8.0}
    assert "squibd live (idle guest)" not in save
    table = chart.markdown_table(pause, save, "_t_")
    assert "| QEMU migrate (paused VM) | 4 | 8000.0 | 8.000 |" in table


def test_chart_writes_png_and_table(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib is the bench extra")
    results = tmp_path / "results.json"
    results.write_text(json.dumps(SAMPLE_RESULTS), encoding="utf-8")
    png, table = tmp_path / "r.png", tmp_path / "r.md"
    assert chart.main(["--results", str(results), "--output", str(png),
                       "--table", str(table)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "squibd live (idle guest)" in table.read_text(encoding="utf-8")


def test_chart_skips_when_no_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"benches": {"rpc": {"_status": "ok", "rpc_rps": 9}}}),
                       encoding="utf-8")
    with pytest.raises(SystemExit) as exc:
        chart.main(["--results", str(results), "--output", str(tmp_path / "x.png"),
                    "--table", str(tmp_path / "x.md")])
    assert exc.value.code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["skipped"] is True
    assert not (tmp_path / "x.png").exists()


def test_run_all_main_writes_results_with_machine_info(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # A bench directory of two scripts (one crashing) stands in for bench/.
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    _script(bench_dir, "alpha", 'print(\'{"alpha_s": 1.5}\')\n')
    _script(bench_dir, "beta", "raise SystemExit(2)\n")
    _script(bench_dir, "_helper", "raise AssertionError('helpers are not benches')\n")
    monkeypatch.setattr(run_all, "BENCH_DIR", bench_dir)
    out = tmp_path / "results.json"
    assert run_all.main(["--quick", "--output", str(out), "--no-chart"]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    assert set(results["benches"]) == {"alpha", "beta"}
    assert results["benches"]["alpha"]["_status"] == "ok"
    assert results["benches"]["beta"]["_status"] == "error"
    assert results["machine"]["nproc"] == os.cpu_count()
    assert results["quick"] is True and results["date"]
    assert run_all.main(["--quick", "--output", str(out), "--no-chart", "--strict"]) == 1


def test_run_all_merge_keeps_other_benches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    _script(bench_dir, "alpha", 'print(\'{"v": 2}\')\n')
    monkeypatch.setattr(run_all, "BENCH_DIR", bench_dir)
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"benches": {"old": {"_status": "ok", "v": 0},
                                           "alpha": {"_status": "ok", "v": 1}}}),
                   encoding="utf-8")
    assert run_all.main(["--only", "alpha", "--merge", "--output", str(out), "--no-chart"]) == 0
    benches = json.loads(out.read_text(encoding="utf-8"))["benches"]
    assert benches["old"]["v"] == 0
    assert benches["alpha"]["v"] == 2
    assert run_all.main(["--only", "alpha", "--output", str(out), "--no-chart"]) == 0
    assert set(json.loads(out.read_text(encoding="utf-8"))["benches"]) == {"alpha"}
