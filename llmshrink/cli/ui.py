"""Terminal rendering for the CLI: the only module family that imports rich.

Results go to stdout (tables, or JSON with ``--json``); progress and errors
go to stderr so that ``--json`` output stays machine-readable.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
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
    err.print(f"[bold red]error:[/] {e.message}", highlight=False)
    if e.hint:
        err.print(e.hint, highlight=False)


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/] {message}", highlight=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


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


@contextmanager
def progress(enabled: bool = True) -> Iterator[Progress]:
    """A progress reporter for one command; plain logging when ``enabled`` is false."""
    if not enabled:
        yield Progress()
        return
    bar = RichProgressBar(
        SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
        MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
        console=err, transient=False,
    )
    with bar:
        yield RichProgress(bar)
