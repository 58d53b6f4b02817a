"""Trial progress for ``optimize``: a rich bar on a terminal, one plain line per trial in a log file.

    with StudyProgress(total=40, metric="1-cos") as progress:       # nothing drawn until the first trial
        run_optimize(settings, progress=progress, echo=progress.echo)

``StudyProgress`` is an Optuna callback (``study.optimize(callbacks=[progress])``). On a TTY (stderr) it draws
rich's bar with trials done / total, rate, elapsed time, ETA and the best value so far; elsewhere (a log file, a
pipe, CI) it writes one complete line per trial, no carriage returns. Leaving the ``with`` block (done, timeout,
error or Ctrl-C) stops the bar, so the terminal line always ends; :meth:`echo` stops it before printing the
result table, and :func:`schedsearch.cli.stop_live` stops it before an error line.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("- trials/s", style="progress.data.speed")
        return Text(f"{speed:.2f} trials/s" if speed >= 0.1 else f"{60 * speed:.2f} trials/min",
                    style="progress.data.speed")


def _best(study: Any) -> str:
    if len(study.directions) > 1:
        return f"front of {len(study.best_trials)}"
    try:
        return f"{study.best_value:.5f}"
    except ValueError:  # no completed trial yet
        return "-"


class StudyProgress:
    """Optuna callback drawing this invocation's trials; see the module docstring."""

    def __init__(self, total: int | None, metric: str = "value", stream: TextIO | None = None):
        self.total = None if total is None else int(total)  # None: unknown in advance (gsearch without --trials)
        self.metric = metric
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.t0 = time.perf_counter()
        self._progress: Progress | None = None
        self._task: Any = None
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> StudyProgress:
        from schedsearch.cli import LIVE

        LIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        from schedsearch.cli import LIVE

        self.stop()
        if self in LIVE:
            LIVE.remove(self)

    def _start(self) -> None:
        console = Console(file=self.stream, force_terminal=True)
        self._progress = Progress(
            TextColumn("[bold]trials"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn(f"best {self.metric} {{task.fields[best]}}"),
            console=console, transient=False, redirect_stdout=False, redirect_stderr=False)
        self._task = self._progress.add_task("trials", total=self.total, best="-")
        self._progress.start()

    def stop(self) -> None:
        """End the bar's line (idempotent); the last state stays on screen."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def echo(self, message: str) -> None:
        """Print a result line on stdout after the bar has been closed."""
        self.stop()
        print(message, flush=True)

    # -- Optuna callback -----------------------------------------------------------------------------
    def __call__(self, study: Any, trial: Any) -> None:
        self.done += 1  # trials of this invocation (a resumed study has earlier ones too)
        if self.done == 1:  # rates and ETA count from the first trial's start, not from loading the model
            took = trial.datetime_complete - trial.datetime_start if trial.datetime_complete and \
                trial.datetime_start else None
            self.t0 = time.perf_counter() - (took.total_seconds() if took is not None else 0.0)
        best = _best(study)
        if self.tty:
            if self._progress is None:
                self._start()
            self._progress.update(self._task, completed=self.done if self.total is None else
                                  min(self.done, self.total), best=best)
            if self.total is not None and self.done >= self.total:
                self.stop()
            return
        values = trial.values or []
        value = "/".join(f"{v:.5f}" for v in values) if values else trial.state.name.lower()
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else math.inf
        left = None if self.total is None else max(0, self.total - self.done)
        eta = f"{left / rate:.0f}s" if left is not None and rate and math.isfinite(rate) else "-"
        of = "" if self.total is None else f"/{self.total}"
        self.stream.write(f"trial {self.done}{of} {self.metric} {value} best {best} "
                          f"({elapsed:.0f}s, {rate:.2f} trials/s, ETA {eta})\n")
        self.stream.flush()
