"""bench/_common.py: statistics, timing helpers, random fill, the JSON line protocol."""

from __future__ import annotations

import json
import mmap
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

import _common
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

BENCH_DIR = Path(_common.__file__).resolve().parent

samples_st = st.lists(st.floats(min_value=0, max_value=1e6, allow_nan=False), min_size=1,
                      max_size=50)


@settings(max_examples=60, deadline=None)
@given(samples_st)
def test_stats_median_lies_between_min_and_max(samples: list[float]) -> None:
    stats = _common.summarize(samples)
    assert stats.min <= stats.median <= stats.max
    assert stats.median == statistics.median(samples)
    assert stats.n == len(samples)
    d = stats.to_dict(p99=True)
    assert set(d) == {"median", "min", "max", "n", "p99"}


@settings(max_examples=60, deadline=None)
@given(samples_st, st.floats(min_value=0.01, max_value=100))
def test_percentile_is_a_sample_not_below_lower_ranks(samples: list[float], pct: float) -> None:
    p = _common.percentile(samples, pct)
    assert p in samples
    below = sum(1 for s in samples if s <= p)
    assert below / len(samples) >= pct / 100 - 1e-9


def test_percentile_100_is_max_and_rejects_bad_input() -> None:
    assert _common.percentile([3.0, 1.0, 2.0], 100) == 3.0
    with pytest.raises(ValueError, match="percentile"):
        _common.percentile([1.0], 0)
    with pytest.raises(ValueError, match="no samples"):
        _common.summarize([])


def test_ratio_handles_missing_and_zero() -> None:
    assert _common.ratio(1.0, 4.0) == 0.25
    assert _common.ratio(None, 4.0) is None
    assert _common.ratio(1.0, None) is None
    assert _common.ratio(1.0, 0.0) is None


def test_measure_runs_warmup_then_reps_with_setup_and_teardown() -> None:
    calls: list[str] = []
    stats = _common.measure(lambda: calls.append("fn"), reps=5, warmup=2,
                            setup=lambda: calls.append("setup"),
                            teardown=lambda: calls.append("teardown"))
    assert stats.n == 5
    assert calls == ["setup", "fn", "teardown"] * 7
    assert all(s >= 0 for s in stats.samples)


async def test_measure_async_counts_repetitions() -> None:
    count = 0

    async def fn() -> None:
        nonlocal count
        count += 1

    stats = await _common.measure_async(fn, reps=5, warmup=1)
    assert stats.n == 5
    assert count == 6


def test_parse_args_enforces_minimum_repetitions() -> None:
    args = _common.parse_args("x", ["--quick", "--reps", "2"])
    assert args.quick is True
    assert args.reps == _common.MIN_REPETITIONS
    assert _common.parse_args("x", ["--reps", "9"]).reps == 9


def test_fill_random_is_seeded_and_covers_odd_lengths() -> None:
    a = bytearray(4099)
    b = bytearray(4099)
    _common.fill_random(a, seed=7)
    _common.fill_random(b, seed=7)
    assert a == b
    _common.fill_random(b, seed=8)
    assert a != b
    # The tail past the last whole 8-byte word is filled too.
    assert a[-3:] != b[-3:] or a[:8] != b[:8]
    assert a.count(0) < len(a) // 16


def test_fill_random_reaches_every_page_of_a_mapping() -> None:
    size = 3 * mmap.PAGESIZE
    with mmap.mmap(-1, size) as m:
        _common.fill_random(memoryview(m), seed=1)
        for page in range(3):
            chunk = m[page * mmap.PAGESIZE:(page + 1) * mmap.PAGESIZE]
            assert chunk != bytes(mmap.PAGESIZE)


def test_fill_random_fd_writes_exactly_size_bytes_at_offset(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _common.fill_random_fd(fd, 10_000, offset=100, seed=3)
        assert os.fstat(fd).st_size == 10_100
        assert os.pread(fd, 100, 0) == bytes(100)
        assert os.pread(fd, 10_000, 100) != bytes(10_000)
    finally:
        os.close(fd)


def test_machine_info_names_the_machine() -> None:
    info = _common.machine_info()
    assert info["nproc"] == os.cpu_count()
    assert isinstance(info["kernel"], str) and info["kernel"]
    assert info["memory_bytes"] is None or info["memory_bytes"] > 0


def _run_script(tmp_path: object, body: str) -> subprocess.CompletedProcess[str]:
    script = os.path.join(str(tmp_path), "b.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(f"import sys\nsys.path.insert(0, {str(BENCH_DIR)!r})\nimport _common\n")
        f.write(textwrap.dedent(body))
    return subprocess.run([sys.executable, script, "--quick"], capture_output=True, text=True,
                          check=False)


def test_run_bench_prints_one_json_object_last(tmp_path: object) -> None:
    proc = _run_script(tmp_path, """
        def main(args):
            print("progress chatter")
            return {"x_s": _common.summarize([1.0, 2.0, 3.0, 4.0, 5.0])}
        _common.run_bench("demo", main, _common.parse_args("demo"))
    """)
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last == {"bench": "demo", "quick": True,
                    "x_s": {"median": 3.0, "min": 1.0, "max": 5.0, "n": 5}}


def test_run_bench_reports_a_crash_as_json_error(tmp_path: object) -> None:
    proc = _run_script(tmp_path, """
        def main(args):
            raise OSError("disk on fire")
        _common.run_bench("demo", main, _common.parse_args("demo"))
    """)
    assert proc.returncode == 1
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["bench"] == "demo"
    assert last["error"] == "OSError: disk on fire"
    assert "Traceback" in proc.stderr


def test_skip_exits_zero_with_reason(tmp_path: object) -> None:
    proc = _run_script(tmp_path, """
        _common.skip("demo", "no frobnicator here")
    """)
    assert proc.returncode == 0
    assert json.loads(proc.stdout.strip()) == {"bench": "demo", "skipped": True,
                                               "reason": "no frobnicator here"}
