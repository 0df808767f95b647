"""Progress reporting without printing.

The library never prints. Long operations take a :class:`Progress` and open
tasks on it; the CLI passes a rich-backed implementation, library users get
:class:`Progress` itself, which only logs the start and end of each task.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("llmshrink")


class Task:
    """Handle of one running task: advance it, or update its displayed fields."""

    def __init__(self, description: str, total: float | None) -> None:
        self.description = description
        self.total = total
        self.completed = 0.0
        self.fields: dict[str, Any] = {}

    def advance(self, n: float = 1, **fields: Any) -> None:
        """Mark ``n`` more units done and set any named display fields."""
        self.completed += n
        self.fields.update(fields)

    def update(self, *, total: float | None = None, **fields: Any) -> None:
        """Change the total (once it is known) or display fields."""
        if total is not None:
            self.total = total
        self.fields.update(fields)


class Progress:
    """Default reporter: logs each task's start and end with its duration."""

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Task]:
        """Open a task for the duration of the ``with`` block."""
        start = time.perf_counter()
        log.info("%s ...", description)
        t = self._make_task(description, total)
        try:
            yield t
        finally:
            self._close_task(t)
            log.info("%s done in %.1f s", description, time.perf_counter() - start)

    def _make_task(self, description: str, total: float | None) -> Task:
        return Task(description, total)

    def _close_task(self, task: Task) -> None:
        pass


NULL_PROGRESS = Progress()
