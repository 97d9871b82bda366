"""Progress of long jobs on stderr: one bar per item (an optimize variant), advanced per step.

    with StepProgress("dlpipe optimize", {"*": ("build", "evaluate", "time", "register")}) as p:
        optimize_version(name, version, progress=p)   # p("int8", "evaluate"), p("int8", "done")

In a terminal: rich bars. Elsewhere (CI logs, files): one plain line per step, so a log shows
where the minutes went without carriage-return noise. stdout is never touched, so `--json`
output stays pure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

DONE = "done"
"""The step that ends an item."""


class StepProgress:
    """A `progress(item, step)` callback drawing one bar per item.

    Args:
        prog: the command, prefixed to plain lines.
        steps: the ordered steps of each item; key `"*"` for items not named.
        hands_off: steps that draw their own bar (MLflow's download bar): no live display is
            started for them, so two displays never fight over the terminal.
    """

    def __init__(
        self,
        prog: str,
        steps: Mapping[str, Sequence[str]],
        *,
        console: Console | None = None,
        hands_off: Sequence[str] = ("download",),
    ) -> None:
        self.prog = prog
        self.steps = steps
        self.hands_off = tuple(hands_off)
        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal and not self.console.is_dumb_terminal
        self._bars: Progress | None = None
        self._tasks: dict[str, TaskID] = {}
        self._done: set[str] = set()
        self._started = time.monotonic()

    def __call__(self, item: str, step: str) -> None:
        if not self.live:
            elapsed = time.monotonic() - self._started
            line = f"{self.prog}: [{elapsed:7.1f} s] {item}: {step}"
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            return
        if self._bars is None and step in self.hands_off:
            self.console.print(f"{item}: {step}", markup=False, highlight=False)
            return
        bars = self._start()
        steps = self.steps.get(item, self.steps.get("*", ()))
        total = len(steps) or 1
        if item not in self._tasks:
            self._tasks[item] = bars.add_task(item, total=total)
        task = self._tasks[item]
        if step == DONE:
            bars.update(task, completed=total, description=f"{item}: {DONE}")
            bars.stop_task(task)
            self._done.add(item)
            if self._done >= self._tasks.keys():  # nothing left running: give the terminal back
                self.close()
            return
        update: dict[str, Any] = {"description": f"{item}: {step}"}
        if step in steps:
            update["completed"] = steps.index(step)
        bars.update(task, **update)

    def _start(self) -> Progress:
        if self._bars is None:
            self._bars = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                MofNCompleteColumn(), TimeElapsedColumn(), console=self.console,
            )  # fmt: skip
            self._tasks, self._done = {}, set()
            self._bars.start()
        return self._bars

    def close(self) -> None:
        """Stop the live display (idempotent)."""
        if self._bars is not None:
            self._bars.stop()
            self._bars = None

    def __enter__(self) -> StepProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
