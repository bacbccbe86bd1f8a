"""Exit-heavy guests, 1 and 2 VMs at once, both runtimes in the same run (issue 11).

Every VM has 1 vCPU and 64 MiB and runs the ``exiter`` guest: one exit to the
VMM per iteration, an ``OUT`` to the work port that the VMM answers with
``work_units`` units of pure-Python work (``squibd/kvm/workdevice.py``), the
guest's progress counter counting completed requests. With the in-process
runtime all vCPU threads share the daemon's GIL for that work (and for the
runner's own Python between two ``KVM_RUN`` calls); with
``vm_isolation = "process"`` each VM process has its own.

Method: per work level, both runtimes get 2 such VMs, started and then
paused. Each repetition measures, in turn, every (runtime, 1 or 2 VMs) case
over a window of ``--window`` seconds: the case's VMs are resumed, each
sends a heartbeat (1024 requests), then their progress counters are read
before and after the window; then they are paused again. Interleaving keeps
the cases comparable on this shared, noisy machine.

Figures (per work level, per runtime, for 1 and 2 VMs; medians, min, max):
- ``progress_per_s``: total guest progress of all VMs running at once, per s
  (one completed work request = one exit, so it is also the work-exit rate).
- ``exits_per_s``: all exits to userspace per s, median: ``progress * (1 +
  1/1024)`` (the guest's heartbeat exits; see ``squibd/kvm/programs.py``).
- ``per_exit_us``: wall time per exit of one VM alone (1 VM case).
- ``vm_cpu_cores``: CPU the VMs used during the window (in-process: this
  process; process: the VM processes; guest time included), in cores.
- ``python_us_per_exit`` / ``kvm_us_per_exit``: CPU per work exit spent
  in user mode outside the guest (Python: the runner and the work device,
  holding the GIL; ``utime - guest_time`` of ``/proc/PID/stat``) and in
  ``KVM_RUN`` (``stime + guest_time``, the GIL released).
- ``gil_bound_2_over_1`` (in-process only): the 2-VM scaling one GIL allows
  at the 1-VM CPU split, ``min(2, (python + kvm) / python)``, if nothing else
  limits it.
- ``host_busy_cores``: the whole machine's busy cores during the window
  (``/proc/stat``): what the VMs used plus everybody else's load.
- Baseline, ``spin``: each round also runs 1 and then 2 processes that only
  spin (pure CPU, no exits, no GIL sharing) for a window: ``spin.cores`` is
  the CPU they got and ``spin.scaling_2_over_1`` the best scaling this
  machine allowed at that moment (the host is shared: when other load holds
  the cores, no runtime can reach 2x). A round is *clean* when that scaling
  was at least 1.8 just before and just after it; ``clean`` repeats the
  figures over the clean rounds only (``--clean-rounds N`` keeps measuring,
  up to ``--max-rounds``, until N rounds were clean).
- ``scaling_2_over_1`` and ``process_over_inprocess`` ratios of the medians.
The headline fields repeat the default work level
(``squibd.kvm.guest.EXITER_DEFAULT_WORK_UNITS``). ``uptime`` load averages
before and after the run are reported too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import _common
import trio

MODES = ("process", "inprocess")
VM_COUNTS = (1, 2)
MEM_MIB = 64
WINDOW_S = 1.0
QUICK_WINDOW_S = 0.3
#: Work units per exit measured besides the default: none (the exit and the
#: runner alone) and a heavy device model (the GIL share of each exit grows).
EXTRA_WORK_LEVELS = (0, 128)
#: A round is "clean" when 2 spinning processes got at least this many times
#: the CPU of one, both just before and just after it (a second core was free).
CLEAN_SPIN_SCALING = 1.8
#: Rounds a level runs at most while waiting for clean rounds (``--clean-rounds``).
MAX_ROUNDS = 40
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: /proc/stat cpu line: user nice system idle iowait irq softirq steal (guest
#: time is already inside user and nice, so the two guest columns are left out).
_IDLE_COLUMNS = (3, 4)
_COUNTED_COLUMNS = 8


def _host_ticks() -> tuple[int, int]:
    """(busy, total) clock ticks of the whole machine so far."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1 : 1 + _COUNTED_COLUMNS]]
    idle = sum(fields[i] for i in _IDLE_COLUMNS)
    return sum(fields) - idle, sum(fields)


def _process_ticks(pid: int) -> tuple[int, int, int]:
    """(utime, stime, guest_time) of process ``pid`` (all its threads), in clock ticks.

    utime includes guest_time (the vCPU inside ``KVM_RUN`` in guest mode), so
    ``utime - guest_time`` is the user-mode time outside the guest: Python,
    holding the GIL.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields[k - 3] is field k of proc(5)
    return int(fields[11]), int(fields[12]), int(fields[40])  # fields 14, 15 and 43


def _ticks(pids: list[int]) -> tuple[int, int, int]:
    per_pid = [_process_ticks(pid) for pid in pids]
    return (sum(t[0] for t in per_pid), sum(t[1] for t in per_pid), sum(t[2] for t in per_pid))


#: A process that spins for argv[1] seconds and prints the CPU cores it got.
_SPIN = (
    "import sys, time\n"
    "end = time.perf_counter() + float(sys.argv[1]); t0 = time.perf_counter()\n"
    "c0 = time.process_time()\n"
    "while time.perf_counter() < end: pass\n"
    "print((time.process_time() - c0) / (time.perf_counter() - t0))\n"
)


async def _spin_cores(count: int, window_s: float) -> float:
    """Total CPU cores ``count`` spinning processes got over ``window_s``."""

    def spin() -> float:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _SPIN, str(window_s)], stdout=subprocess.PIPE, text=True
            )
            for _ in range(count)
        ]
        return sum(float(proc.communicate()[0]) for proc in procs)

    return await trio.to_thread.run_sync(spin)


def _cpu_pids(mode: str, vms: list[Any]) -> list[int]:
    return [vm.process_id for vm in vms] if mode == "process" else [os.getpid()]


async def _runtime(mode: str) -> Any:
    from squibd.vm.runtime import Runtime

    rt = Runtime(vm_isolation=mode, quiesce_timeout_s=5.0)
    await rt.reattach()  # starts the warm zygote (no state dir: nothing to re-attach)
    return rt


async def _window(
    rt: Any, mode: str, vms: list[Any], ids: list[str], window_s: float
) -> dict[str, float]:
    """Run ``vms`` together for one window; progress, CPU and host load figures."""
    for vm_id in ids:
        await rt.resume(vm_id)
    for vm in vms:
        await vm.wait_heartbeats(1)  # running, past the resume
    pids = _cpu_pids(mode, vms)
    user0, sys0, guest0 = _ticks(pids)
    busy0, total0 = _host_ticks()
    before = [vm.guest_progress()[0] for vm in vms]
    t0 = time.perf_counter()
    await trio.sleep(window_s)
    after = [vm.guest_progress()[0] for vm in vms]
    took = time.perf_counter() - t0
    busy1, total1 = _host_ticks()
    user1, sys1, guest1 = _ticks(pids)
    for vm_id in ids:
        await rt.pause(vm_id)
    ncpu = os.cpu_count() or 1
    done = max(1, sum(a - b for a, b in zip(after, before, strict=True)))
    python_s = (user1 - user0 - (guest1 - guest0)) / _CLK_TCK
    kvm_s = (sys1 - sys0 + guest1 - guest0) / _CLK_TCK
    return {
        "progress_per_s": sum(a - b for a, b in zip(after, before, strict=True)) / took,
        "vm_cpu_cores": (python_s + kvm_s) / took,
        "python_us_per_exit": python_s * 1e6 / done,
        "kvm_us_per_exit": kvm_s * 1e6 / done,
        "host_busy_cores": (busy1 - busy0) / max(1, total1 - total0) * ncpu,
    }


def _spin_scaling(spin: dict[int, float]) -> float:
    return spin[2] / spin[1] if spin[1] > 0 else 0.0


async def _spins(window_s: float) -> dict[int, float]:
    return {n: await _spin_cores(n, window_s) for n in VM_COUNTS}


def _summary(samples: dict[tuple[str, int], list[dict[str, float]]]) -> dict[str, Any]:
    """Per runtime: the figures' statistics over the recorded rounds."""
    from squibd.kvm.programs import EXITER_HEARTBEAT_INTERVAL

    exits_per_request = 1 + 1 / EXITER_HEARTBEAT_INTERVAL

    def stats(mode: str, n: int, key: str) -> _common.Stats:
        return _common.summarize([s[key] for s in samples[(mode, n)]])

    out: dict[str, Any] = {}
    for mode in MODES:
        medians = {str(n): stats(mode, n, "progress_per_s").median for n in VM_COUNTS}
        out[mode] = {
            "progress_per_s": {
                str(n): stats(mode, n, "progress_per_s").to_dict(digits=1) for n in VM_COUNTS
            },
            "exits_per_s": {n: round(m * exits_per_request) for n, m in medians.items()},
            "per_exit_us": round(1e6 / (medians["1"] * exits_per_request), 2),
            "scaling_2_over_1": _common.ratio(medians["2"], medians["1"]),
            **{
                key: {str(n): round(stats(mode, n, key).median, 2) for n in VM_COUNTS}
                for key in ("vm_cpu_cores", "python_us_per_exit", "kvm_us_per_exit",
                            "host_busy_cores")
            },
        }  # fmt: skip
    one = out["inprocess"]
    python_us, kvm_us = one["python_us_per_exit"]["1"], one["kvm_us_per_exit"]["1"]
    one["gil_bound_2_over_1"] = (
        round(min(2.0, (python_us + kvm_us) / python_us), 3) if python_us > 0 else None
    )
    out["process_over_inprocess"] = {
        str(n): _common.ratio(out["process"]["progress_per_s"][str(n)]["median"],
                              out["inprocess"]["progress_per_s"][str(n)]["median"])
        for n in VM_COUNTS
    }  # fmt: skip
    return out


async def _level(work_units: int, args: Any, window_s: float) -> dict[str, Any]:
    from squibd.vm.models import GuestSpec

    guest = GuestSpec("exiter", {"work_units": work_units})
    runtimes: dict[str, Any] = {}
    handles: dict[str, list[Any]] = {}
    Samples = dict[tuple[str, int], list[dict[str, float]]]
    samples: Samples = {(mode, n): [] for mode in MODES for n in VM_COUNTS}
    clean: Samples = {(mode, n): [] for mode in MODES for n in VM_COUNTS}
    spins: dict[int, list[float]] = {n: [] for n in VM_COUNTS}
    rounds = 0
    try:
        for mode in MODES:
            rt = runtimes[mode] = await _runtime(mode)
            handles[mode] = []
            for i in range(max(VM_COUNTS)):
                vm = await rt.create_vm(f"x{i}", 1, MEM_MIB, False, guest)
                await rt.start(f"x{i}")
                await vm.wait_heartbeats(1)
                await rt.pause(f"x{i}")
                handles[mode].append(vm)
        spin_before = await _spins(window_s)
        # Round 0 warms up, unrecorded; then at least ``reps`` rounds, and more
        # (up to ``max_rounds``) until ``clean_rounds`` rounds were clean.
        while True:
            figures = {
                (mode, n): await _window(
                    runtimes[mode], mode, handles[mode][:n], [f"x{i}" for i in range(n)], window_s
                )
                for mode in MODES
                for n in VM_COUNTS
            }
            spin_after = await _spins(window_s)
            if rounds > 0:
                for key, value in figures.items():
                    samples[key].append(value)
                for n in VM_COUNTS:
                    spins[n].append(spin_after[n])
                free = min(_spin_scaling(spin_before), _spin_scaling(spin_after))
                if free >= CLEAN_SPIN_SCALING:
                    for key, value in figures.items():
                        clean[key].append(value)
            spin_before = spin_after
            clean_count = len(clean[(MODES[0], 1)])
            if rounds >= args.reps and clean_count >= args.clean_rounds:
                break
            if rounds >= max(args.reps, args.max_rounds):
                break
            rounds += 1
    finally:
        for rt in runtimes.values():
            await rt.aclose()
    out = _summary(samples)
    spin = {str(n): _common.summarize(spins[n]) for n in VM_COUNTS}
    out["spin"] = {
        "cores": {n: stats.to_dict(digits=2) for n, stats in spin.items()},
        "scaling_2_over_1": _common.ratio(spin["2"].median, spin["1"].median),
    }
    out["rounds"] = len(samples[(MODES[0], 1)])
    out["clean"] = {"rounds": len(clean[(MODES[0], 1)])}
    if clean[(MODES[0], 1)]:
        out["clean"].update(_summary(clean))
    return out


def main(args: Any) -> dict[str, Any]:
    if not _common.kvm_available():
        _common.skip("vm_scaling", "needs /dev/kvm")
    from squibd.kvm.guest import EXITER_DEFAULT_WORK_UNITS

    window_s = args.window if args.window else (QUICK_WINDOW_S if args.quick else WINDOW_S)
    levels = [EXITER_DEFAULT_WORK_UNITS]
    if not args.quick:
        levels += [w for w in EXTRA_WORK_LEVELS if w != EXITER_DEFAULT_WORK_UNITS]
    load_before = os.getloadavg()

    async def run() -> dict[str, Any]:
        results = {}
        for work_units in levels:
            _common.log(
                f"work_units={work_units}: {args.reps}+ rounds (until {args.clean_rounds} "
                f"clean, at most {max(args.reps, args.max_rounds)}) of "
                f"{len(MODES) * len(VM_COUNTS)} windows of {window_s} s"
            )
            results[str(work_units)] = await _level(work_units, args, window_s)
        return results

    results = trio.run(run)
    head = results[str(EXITER_DEFAULT_WORK_UNITS)]
    return {
        "work_units": EXITER_DEFAULT_WORK_UNITS,
        "progress_per_s": {mode: {n: head[mode]["progress_per_s"][n]["median"]
                                  for n in head[mode]["progress_per_s"]} for mode in MODES},
        "exits_per_s": {mode: head[mode]["exits_per_s"] for mode in MODES},
        "scaling_2_over_1": {mode: head[mode]["scaling_2_over_1"] for mode in MODES},
        "process_over_inprocess_2_vms": head["process_over_inprocess"]["2"],
        "inprocess_gil_bound_2_over_1": head["inprocess"]["gil_bound_2_over_1"],
        "spin_scaling_2_over_1": head["spin"]["scaling_2_over_1"],
        "clean_rounds": head["clean"]["rounds"],
        "clean_scaling_2_over_1": {
            mode: head["clean"][mode]["scaling_2_over_1"] for mode in MODES
        } if head["clean"]["rounds"] else None,
        "levels": results,
        "window_s": window_s,
        "reps": args.reps,
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "machine": _common.machine_info(),
    }  # fmt: skip


def _extra(parser: Any) -> None:
    parser.add_argument(
        "--clean-rounds",
        type=int,
        default=0,
        help="per work level, keep measuring (up to --max-rounds) until this "
        "many rounds were clean (a second core free); default 0",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=MAX_ROUNDS,
        help=f"the most rounds per work level (default {MAX_ROUNDS})",
    )
    parser.add_argument("--window", type=float, default=None,
                        help=f"seconds per measuring window (default {WINDOW_S}, "
                             f"--quick {QUICK_WINDOW_S})")  # fmt: skip


if __name__ == "__main__":
    _common.run_bench("vm_scaling", main, _common.parse_args(__doc__ or "", extra=_extra))
