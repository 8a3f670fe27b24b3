"""One progress style for every long step, silenceable for tests and JSON output.

On a terminal it is a rich progress bar. Off a terminal (CI, nohup, a job scheduler, a
redirected log) rich would draw nothing until the end, so each step prints one plain line
instead: the step, how far it is, the time elapsed and an estimate of the time left.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class PlainProgress:
    """The part of rich's ``Progress`` API the pipeline uses, printed as one line per step."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tasks: list[dict] = []

    def add_task(self, description: str, total: float | None = None, completed: float = 0) -> int:
        self.tasks.append({"description": description, "total": total, "completed": completed,
                           "first": completed, "start": time.monotonic()})
        return len(self.tasks) - 1

    def update(self, task: int, *, advance: float = 0, completed: float | None = None,
               description: str | None = None) -> None:
        t = self.tasks[task]
        if description is not None:
            t["description"] = description
        if completed is not None:
            t["completed"] = completed
        t["completed"] += advance
        if advance or completed is not None:  # a description alone announces work that has not happened
            self.stream.write(self.line(t) + "\n")
            self.stream.flush()

    @staticmethod
    def line(t: dict) -> str:
        elapsed = time.monotonic() - t["start"]
        done, total = t["completed"] - t["first"], t["total"]
        text = f"{t['description']}: {t['completed']:g}" + (f"/{total:g}" if total else "")
        text += f", {_clock(elapsed)} elapsed"
        if total and done > 0 and t["completed"] < total:
            text += f", about {_clock(elapsed / done * (total - t['completed']))} left"
        return text


@contextlib.contextmanager
def progress_bar(enabled: bool = True, stream: TextIO | None = None) -> Iterator[Progress | PlainProgress]:
    """A rich Progress on a terminal's stderr, plain lines elsewhere; disabled it still accepts
    calls and prints nothing."""
    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        yield PlainProgress(stream)
        return
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(file=stream), disable=not enabled,
                   transient=False)
    with bar:
        yield bar
