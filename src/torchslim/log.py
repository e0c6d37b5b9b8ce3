"""The console every part of torchslim logs to, warnings recorded for the report, and progress with
an estimate of the time left. At the bottom of the import graph: it imports nothing of torchslim."""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.text import Text


class _LogConsole(Console):
    """Log lines without the source file:line; written to a pipe or a file, one unwrapped line each
    (rich would wrap them at 80 columns), with the time in front."""

    def log(self, *objects, **kwargs) -> None:
        if self.is_terminal:
            return super().log(*objects, **kwargs)
        self.print(time.strftime("[%H:%M:%S]"), *objects, soft_wrap=True, highlight=False)


# markup off: log lines carry user text (paths, shapes like [batch, 10]) that rich would read as tags
console = _LogConsole(stderr=True, log_path=False, markup=False)
WARNINGS: list[str] = []  # what warn() said since the pipeline last collected it (for the report)


def warn(message: str) -> None:
    """A problem the run can go on with: said on the console, and recorded in the stage's report entry."""
    WARNINGS.append(message)
    console.log(Text("warning: ", style="bold yellow") + Text(message))


def collect_warnings() -> list[str]:
    said = list(WARNINGS)
    WARNINGS.clear()
    return said


class _Bar(Progress):
    """A progress bar on a terminal; one at a time (a phase inside another phase logs lines instead,
    whatever rich version is installed)."""

    active = 0

    def __enter__(self):
        _Bar.active += 1
        return super().__enter__()

    def __exit__(self, *exc):
        _Bar.active -= 1
        return super().__exit__(*exc)


def progress_bar() -> Progress:
    return _Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal or _Bar.active > 0,
    )


class _Steps:
    def __init__(self, what: str, total: int, bar: Progress, task):
        self.what, self.total, self.bar, self.task = what, total, bar, task
        self.done, self.start, self._said = 0, time.perf_counter(), time.perf_counter()

    def advance(self, n: int = 1) -> None:
        """One step finished: the bar moves (on a terminal); in a log, a line with the time left at
        most every 30 s."""
        self.done += n
        self.bar.update(self.task, advance=n)
        now = time.perf_counter()
        if not self.bar.disable or now - self._said < 30 or self.done >= self.total:
            return
        self._said = now
        left = (now - self.start) / self.done * (self.total - self.done)
        console.log(f"{self.what}: {self.done}/{self.total} done, about {_duration(left)} left")


@contextlib.contextmanager
def steps(what: str, total: int) -> Iterator[_Steps]:
    """Progress of a phase of `total` steps (calibration, per-layer sensitivity, screening, trials)
    with an estimate of the time left, on a terminal as a bar and in a log as periodic lines."""
    with progress_bar() as bar:
        tracker = _Steps(what, total, bar, bar.add_task(what, total=total))
        yield tracker
    taken = time.perf_counter() - tracker.start
    if taken > 5:
        console.log(f"{what}: {tracker.done} step(s) in {_duration(taken)}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
