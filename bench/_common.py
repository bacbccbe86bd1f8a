"""Shared helpers for the squibd benchmarks (see ../shared/BENCH.md).

Every benchmark in ``bench/`` runs alone as ``python bench/<name>.py [--quick]``,
prints ONE JSON object on its last line and exits 0. This module holds what
they all need so that the figures are measured and reported the same way:

- :func:`parse_args` gives the common command line (``--quick``, ``--reps``).
- :func:`measure` / :func:`measure_async` time a callable after warm-up runs
  and return :class:`Stats` (median, min, max over the repetitions).
- :class:`Stopwatch` times one block (``with Stopwatch() as sw: ...; sw.seconds``).
- :func:`ratio` divides two figures, ``None`` when either is missing.
- :func:`fill_random` / :func:`fill_random_fd` fill buffers or files with
  incompressible bytes quickly.
- :func:`emit` prints the final JSON line; :func:`run_bench` wraps a bench's
  ``main`` so that a crash still prints one JSON object naming the error, and
  :func:`skip` reports a bench that cannot run here (exit 0).
- :func:`log` prints progress on stderr (stdout ends with the JSON line).
- :func:`machine_info` describes this machine (nproc, memory, kernel, CPU).

Run from the repository root, ``bench/`` is ``sys.path[0]``, so a bench
imports this module as ``import _common``.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import attrs
import numpy as np

# BENCH.md: "Report medians over at least 5 repetitions, plus min and max."
MIN_REPETITIONS = 5
# One warm-up run before measuring (page cache, imports, first-touch faults).
DEFAULT_WARMUP = 1
# Fill buffers in 64 MiB slices: big enough for numpy to run at memory speed,
# small enough not to double a multi-GiB guest's footprint.
FILL_CHUNK = 64 * 1024 * 1024
MIB = 1024 * 1024
#: Read size of the eager-copy baseline (large enough to amortise syscalls).
EAGER_COPY_BLOCK = 8 * MIB
GIB = 1024 * MIB
# Percentiles reported by Stats.to_dict() when asked (p99 per BENCH.md quiesce/rpc rows).
P99 = 99.0
# Directory for bench files on the ext4 root (not tmpfs): BENCH.md measures durable
# saves, and /dev/shm would hide the fsync cost. Overridable for other machines.
BENCH_TMP_ENV = "SQUIBD_BENCH_TMP"
DEFAULT_BENCH_TMP = "/var/tmp"


@attrs.frozen
class Stats:
    """Summary of repeated measurements of one figure (in the unit of ``samples``)."""

    samples: tuple[float, ...]

    @property
    def n(self) -> int:
        """Number of measured repetitions (warm-up excluded)."""
        return len(self.samples)

    @property
    def median(self) -> float:
        """Median of the samples."""
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        """Smallest sample."""
        return min(self.samples)

    @property
    def max(self) -> float:
        """Largest sample."""
        return max(self.samples)

    def percentile(self, pct: float) -> float:
        """Nearest-rank percentile ``pct`` (0-100] of the samples."""
        return percentile(self.samples, pct)

    def scaled(self, factor: float) -> Stats:
        """The same samples multiplied by ``factor`` (e.g. 1000 for s -> ms)."""
        return Stats(tuple(s * factor for s in self.samples))

    def to_dict(self, *, digits: int = 6, p99: bool = False) -> dict[str, float | int]:
        """``{"median", "min", "max", "n"}`` (plus ``"p99"`` when asked), rounded."""
        out: dict[str, float | int] = {
            "median": round(self.median, digits),
            "min": round(self.min, digits),
            "max": round(self.max, digits),
            "n": self.n,
        }
        if p99:
            out["p99"] = round(self.percentile(P99), digits)
        return out


def summarize(samples: Sequence[float]) -> Stats:
    """Wrap ``samples`` in :class:`Stats`; raises ValueError when empty."""
    if not samples:
        raise ValueError("no samples to summarize")
    return Stats(tuple(float(s) for s in samples))


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile ``pct`` in (0, 100] of ``samples`` (non-empty)."""
    if not samples:
        raise ValueError("no samples for a percentile")
    if not 0.0 < pct <= 100.0:
        raise ValueError(f"percentile must be in (0, 100], got {pct}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return float(ordered[rank - 1])


def ratio(numerator: float | None, denominator: float | None, *, digits: int = 4) -> float | None:
    """``numerator / denominator`` rounded, or ``None`` if either is missing or zero."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return round(numerator / denominator, digits)


@attrs.define(eq=False)
class Stopwatch:
    """Context manager timing one block with ``time.perf_counter``."""

    start: float = 0.0
    seconds: float = math.nan

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start

    @property
    def ms(self) -> float:
        """Elapsed milliseconds."""
        return self.seconds * 1000.0


def measure(
    fn: Callable[[], object],
    *,
    reps: int = MIN_REPETITIONS,
    warmup: int = DEFAULT_WARMUP,
    setup: Callable[[], object] | None = None,
    teardown: Callable[[], object] | None = None,
) -> Stats:
    """Time ``fn()`` ``reps`` times after ``warmup`` untimed runs; seconds.

    ``setup``/``teardown`` run around every call (warm-up included) and are
    not timed (e.g. delete the output file, refill memory).
    """
    samples: list[float] = []
    for i in range(warmup + reps):
        if setup is not None:
            setup()
        try:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        finally:
            if teardown is not None:
                teardown()
        if i >= warmup:
            samples.append(elapsed)
    return summarize(samples)


async def measure_async(
    fn: Callable[[], Awaitable[object]],
    *,
    reps: int = MIN_REPETITIONS,
    warmup: int = DEFAULT_WARMUP,
    setup: Callable[[], Awaitable[object]] | None = None,
    teardown: Callable[[], Awaitable[object]] | None = None,
) -> Stats:
    """Async twin of :func:`measure` (for trio code: runtime, daemon clients)."""
    samples: list[float] = []
    for i in range(warmup + reps):
        if setup is not None:
            await setup()
        try:
            t0 = time.perf_counter()
            await fn()
            elapsed = time.perf_counter() - t0
        finally:
            if teardown is not None:
                await teardown()
        if i >= warmup:
            samples.append(elapsed)
    return summarize(samples)


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    *,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """Common bench command line: ``--quick`` and ``--reps N`` (default 5, min 5).

    ``extra`` may add bench-specific options to the parser.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes so the whole suite runs in ~2 min"
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=MIN_REPETITIONS,
        help=f"measured repetitions per figure (default and minimum {MIN_REPETITIONS})",
    )
    if extra is not None:
        extra(parser)
    args = parser.parse_args(argv)
    args.reps = max(MIN_REPETITIONS, args.reps)
    return args


def random_block(size: int, rng: np.random.Generator) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """``size`` pseudo-random bytes as a uint8 array.

    Uses the bit generator's raw 64-bit output, about 4x faster than
    ``Generator.bytes`` (these bytes only need to be incompressible).
    """
    words = (size + 7) // 8
    raw = rng.bit_generator.random_raw(words)
    return np.asarray(raw, dtype=np.uint64).view(np.uint8)[:size]


def fill_random(buf: memoryview | bytearray, *, seed: int | None = None) -> None:
    """Fill a writable buffer with incompressible pseudo-random bytes."""
    target = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for off in range(0, len(target), FILL_CHUNK):
        end = min(off + FILL_CHUNK, len(target))
        target[off:end] = random_block(end - off, rng)


def fill_random_fd(fd: int, size: int, *, offset: int = 0, seed: int | None = None) -> None:
    """Write ``size`` pseudo-random bytes to ``fd`` starting at ``offset`` (pwrite)."""
    rng = np.random.default_rng(seed)
    pos = offset
    end = offset + size
    while pos < end:
        view = random_block(min(FILL_CHUNK, end - pos), rng).data
        while view:
            n = os.pwrite(fd, view, pos)
            view = view[n:]
            pos += n


def eager_copy(path: str, size: int) -> None:
    """The eager-restore baseline: read a memory file into a fresh memfd mapping."""
    fd = os.open(path, os.O_RDONLY)
    memfd = os.memfd_create("eager-restore", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, size)
        with mmap.mmap(memfd, size, flags=mmap.MAP_SHARED) as target:
            view = memoryview(target)
            try:
                for offset in range(0, size, EAGER_COPY_BLOCK):
                    chunk = view[offset : min(offset + EAGER_COPY_BLOCK, size)]
                    done = 0
                    while done < len(chunk):
                        done += os.preadv(fd, [chunk[done:]], offset + done)
                    chunk.release()
            finally:
                view.release()
    finally:
        os.close(memfd)
        os.close(fd)


def bench_tmpdir() -> str:
    """Directory for bench output files on a real disk (``$SQUIBD_BENCH_TMP`` or /var/tmp)."""
    return os.environ.get(BENCH_TMP_ENV, DEFAULT_BENCH_TMP)


@contextmanager
def scratch_dir(prefix: str = "squibd-bench-") -> Iterator[str]:
    """A fresh directory under :func:`bench_tmpdir`, removed with its files afterwards."""
    with tempfile.TemporaryDirectory(prefix=prefix, dir=bench_tmpdir()) as path:
        yield path


def kvm_available() -> bool:
    """True when /dev/kvm can be opened read-write."""
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def _meminfo_total_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024  # /proc/meminfo reports kB
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """nproc, memory, kernel, CPU model and Python version of this machine."""
    mem = _meminfo_total_bytes()
    return {
        "nproc": os.cpu_count(),
        "memory_bytes": mem,
        "memory_gib": round(mem / GIB, 1) if mem else None,
        "kernel": platform.release(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "kvm": kvm_available(),
    }


def _json_default(obj: object) -> object:
    if isinstance(obj, Stats):
        return obj.to_dict()
    if attrs.has(type(obj)):
        return attrs.asdict(obj)  # type: ignore[arg-type]
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def dumps(result: dict[str, Any]) -> str:
    """One-line JSON for a result (Stats and attrs values converted)."""
    return json.dumps(result, default=_json_default, sort_keys=False)


def emit(result: dict[str, Any]) -> None:
    """Print ``result`` as the bench's single last-line JSON object."""
    sys.stdout.flush()
    print(dumps(result), flush=True)


def log(message: str) -> None:
    """Progress line on stderr (stdout is reserved for the final JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def skip(bench: str, reason: str, **extra: Any) -> NoReturn:
    """Report that ``bench`` cannot run here (JSON with ``skipped``) and exit 0."""
    emit({"bench": bench, "skipped": True, "reason": reason, **extra})
    sys.exit(0)


def run_bench(bench: str, main: Callable[[argparse.Namespace], dict[str, Any]],
              args: argparse.Namespace) -> NoReturn:
    """Run ``main(args)``, emit its dict (``bench`` and ``quick`` added), exit.

    A crash prints the traceback on stderr and a JSON object with ``error`` on
    stdout, then exits 1 so that ``run_all`` records the failure.
    """
    try:
        result = main(args)
    except SystemExit:
        raise
    except BaseException as exc:  # report any crash as JSON
        traceback.print_exc()
        emit({"bench": bench, "quick": bool(args.quick),
              "error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)
    emit({"bench": bench, "quick": bool(args.quick), **result})
    sys.exit(0)
