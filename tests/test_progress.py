"""Progress off a terminal: plain lines with elapsed time and an estimate, silenced when disabled."""

from __future__ import annotations

import io
import re

from se_export import progress
from se_export.progress import PlainProgress, progress_bar


def test_off_a_terminal_every_step_prints_one_plain_line(monkeypatch):
    clock = iter([100.0, 130.0, 160.0, 190.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()  # not a TTY
    with progress_bar(stream=stream) as bar:
        assert isinstance(bar, PlainProgress)
        task = bar.add_task("expanding", total=3)
        bar.update(task, description="layer 0/2")  # announces work: no line yet
        bar.update(task, advance=1)
        bar.update(task, advance=1, description="layer 1/2")
        bar.update(task, advance=1)
    lines = stream.getvalue().splitlines()
    assert lines == ["layer 0/2: 1/3, 0:00:30 elapsed, about 0:01:00 left",
                     "layer 1/2: 2/3, 0:01:00 elapsed, about 0:00:30 left",
                     "layer 1/2: 3/3, 0:01:30 elapsed"]


def test_a_resumed_task_estimates_from_the_work_done_in_this_run(monkeypatch):
    clock = iter([0.0, 10.0])
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    bar = PlainProgress(stream)
    task = bar.add_task("perplexity", total=10, completed=6)
    bar.update(task, advance=2)
    assert stream.getvalue().strip() == "perplexity: 8/10, 0:00:10 elapsed, about 0:00:10 left"


def test_disabled_progress_prints_nothing():
    stream = io.StringIO()
    with progress_bar(enabled=False, stream=stream) as bar:
        task = bar.add_task("x", total=2)
        bar.update(task, advance=2)
    assert stream.getvalue() == ""


def test_on_a_terminal_it_is_a_rich_bar():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    with progress_bar(stream=Terminal()) as bar:
        assert not isinstance(bar, PlainProgress)
        assert re.match(r"rich", type(bar).__module__)
