"""Terminal rendering for the CLI: the only module family that imports rich.

Results go to stdout (tables, or JSON with ``--json``); progress and errors
go to stderr so that ``--json`` output stays machine-readable.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgressBar
from rich.table import Table

from llmshrink.errors import LlmshrinkError
from llmshrink.progress import Progress, Task

out = Console()
err = Console(stderr=True)


def print_json(obj: Any) -> None:
    """Write ``obj`` as indented JSON to stdout (no colour, no wrapping)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def show_error(e: LlmshrinkError) -> None:
    """Render a known error: the message in red, the hint below it."""
    # soft_wrap: a path or a command in a message stays on one line, whole, for copying
    err.print(f"[bold red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
    if e.hint:  # escaped: a hint such as pip install 'llmshrink[eval]' is not rich markup
        err.print(escape(e.hint), highlight=False, soft_wrap=True)


def show_traceback() -> None:
    """The traceback of the exception being handled (``--debug``)."""
    err.print_exception()


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def kv_table(rows: dict[str, Any], title: str | None = None) -> Table:
    """A two-column table of names and values."""
    t = Table(title=title, show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows.items():
        t.add_row(k, str(v))
    return t


class _RichTask(Task):
    def __init__(self, bar: RichProgressBar, description: str, total: float | None) -> None:
        super().__init__(description, total)
        self._bar = bar
        self._id = bar.add_task(description, total=total, info="")

    def _info(self) -> str:
        return "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.fields.items())

    def advance(self, n: float = 1, **fields: Any) -> None:
        super().advance(n, **fields)
        self._bar.update(self._id, advance=n, info=self._info())

    def update(self, *, total: float | None = None, **fields: Any) -> None:
        super().update(total=total, **fields)
        self._bar.update(self._id, total=self.total, info=self._info())

    def finish(self) -> None:
        total = self.total if self.total is not None else max(self.completed, 1)
        self._bar.update(self._id, total=total, completed=total)
        self._bar.stop_task(self._id)


class RichProgress(Progress):
    """:class:`Progress` drawn as rich progress bars on stderr."""

    def __init__(self, bar: RichProgressBar) -> None:
        self._bar = bar

    def _make_task(self, description: str, total: float | None) -> Task:
        return _RichTask(self._bar, description, total)

    def _close_task(self, task: Task) -> None:
        if isinstance(task, _RichTask):
            task.finish()


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s // 60 % 60:02d}:{s % 60:02d}"


class _LineTask(Task):
    def __init__(self, owner: LineProgress, description: str, total: float | None) -> None:
        super().__init__(description, total)
        self._owner = owner
        self.started = time.monotonic()
        self._said = self.started
        self._first: tuple[float, float] | None = None  # (time, units) at the first advance: the rate's origin

    def advance(self, n: float = 1, **fields: Any) -> None:
        super().advance(n, **fields)
        now = time.monotonic()
        if self._first is None:  # a resumed task jumps ahead at once: the rate counts from here
            self._first = (now, self.completed)
        if now - self._said >= self._owner.every:
            self._said = now
            self._owner.line(self._status(now))

    def _status(self, now: float) -> str:
        done = f"{self.completed:g}" + (f"/{self.total:g}" if self.total else "")
        info = "  ".join(str(v) if k == "info" else f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.fields.items())
        eta = ""
        t1, c1 = self._first or (now, self.completed)
        if self.total and c1 < self.completed < self.total:
            eta = f"  ETA {_clock((now - t1) / (self.completed - c1) * (self.total - self.completed))}"
        return f"  {self.description}: {done}{eta}" + (f"  {info}" if info else "")


class LineProgress(Progress):
    """:class:`Progress` as plain lines, for logs and CI (no terminal): a line when a phase starts and
    when it ends, with the time since the command started and the phase's duration, and in long phases
    a status line (step k/N, fields such as the loss, ETA) at most every ``every`` seconds."""

    def __init__(self, console: Console, every: float = 30.0) -> None:
        self._console = console
        self.every = every
        self._t0 = time.monotonic()

    def line(self, text: str) -> None:
        self._console.print(f"[{_clock(time.monotonic() - self._t0)}] {text}", highlight=False, markup=False,
                            soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        t = _LineTask(self, description, total)
        self.line(f"{description} ...")
        try:
            yield t
        except BaseException:
            self.line(f"{description}: stopped after {_clock(time.monotonic() - t.started)}")
            raise
        self.line(f"{description}: done in {_clock(time.monotonic() - t.started)}")


@contextmanager
def progress(enabled: bool = True) -> Iterator[Progress]:
    """A progress reporter for one command: rich bars on a terminal, plain lines otherwise (a log file,
    CI), nothing but the library's logging when ``enabled`` is false."""
    if not enabled:
        yield Progress()
        return
    if not err.is_terminal:
        yield LineProgress(err)
        return
    bar = RichProgressBar(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=err, transient=False,
    )
    with bar:
        yield RichProgress(bar)
