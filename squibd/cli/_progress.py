"""squibctl's progress display: one bar over a whole operation.

The daemon reports ``(phase, done, total)`` per phase; a live save reports
each pre-copy pass from 0 again (``pass-1``, ``pass-2``...). :class:`Tally`
folds the phases into one running total, so the bar only moves forward and
a new pass shows as a phase name and a longer total, not as a restart.
Bytes phases show bytes, rate and ETA; a load's step phases show steps.
"""

from __future__ import annotations

import time
from typing import Final

import attrs
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["Bar", "Tally", "human_bytes"]

_MIB: Final = 1024 * 1024
#: A phase's total below this is a step count (load phases), not bytes.
_STEP_PHASES: Final = frozenset({"read-state", "check-pair", "map-memory", "restore", "done"})


def human_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@attrs.define
class Tally:
    """Cumulative bytes over phases that each count from 0."""

    finished: int = 0
    finished_total: int = 0
    phase: str = ""
    done: int = 0
    total: int = 0
    phases: int = 0
    steps: bool = False

    def update(self, phase: str, done: int, total: int) -> None:
        """Record a report; a new phase closes the previous one."""
        if phase != self.phase:
            if self.phase:
                self.finished += self.done
                self.finished_total += max(self.total, self.done)
            self.phase = phase
            self.phases += 1
            self.steps = phase in _STEP_PHASES
        if self.steps:  # step phases carry (index, count): the whole operation, not one phase
            self.finished = self.finished_total = 0
        self.done, self.total = done, total

    @property
    def completed(self) -> int:
        """Units done over every phase so far."""
        return self.finished + self.done

    @property
    def grand_total(self) -> int:
        """Units known so far (grows when a live save starts another pass)."""
        return self.finished_total + max(self.total, self.done)


class Bar:
    """A rich bar on stderr fed by ``$/progress``; prints a summary line at the end."""

    def __init__(self, console: Console, label: str) -> None:
        self._console = console
        self._label = label
        self._tally = Tally()
        self._started = time.monotonic()
        self._progress = Progress(
            TextColumn("{task.description}"), TextColumn("{task.fields[phase]:<7}"),
            BarColumn(bar_width=20), TextColumn("{task.percentage:>5.1f}%"),
            DownloadColumn(binary_units=True), TransferSpeedColumn(), TimeRemainingColumn(),
            console=console, transient=False,
        )  # fmt: skip
        self._task: TaskID = self._progress.add_task(label, total=None, phase="")

    def __enter__(self) -> Bar:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
        elapsed = max(time.monotonic() - self._started, 1e-9)
        t = self._tally
        if t.phases and not t.steps and exc[0] is None:
            self._console.print(
                f"{self._label}: {human_bytes(t.completed)} in {elapsed:.2f} s "
                f"({human_bytes(t.completed / elapsed)}/s, {t.phases} phase(s))",
                highlight=False, markup=False,
            )

    def update(self, phase: str, done: int, total: int) -> None:
        """Feed one ``$/progress`` report."""
        self._tally.update(phase, done, total)
        t = self._tally
        self._progress.update(
            self._task, completed=t.completed, total=max(t.grand_total, 1), phase=phase
        )
