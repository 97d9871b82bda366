"""Stopping the server's background tasks for sure.

Python 3.11's `asyncio.wait_for` drops a cancellation that arrives in the same loop iteration as
the result of what it waits for: it returns the result and the task goes on (fixed in 3.12;
measured here: 49 of 200 cancellations lost when the inner future finishes at that moment).
A follower loop whose single `cancel()` is lost never ends, and a shutdown that awaits it
hangs. `cancel_and_wait` cancels again until every task has finished.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)

RECANCEL_S = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | None]) -> None:
    """Cancel `tasks` (None entries are skipped) and return once all of them have finished.

    What a task raised while ending (its cancellation or an error) is logged, not re-raised:
    this is for shutdown, where nothing else could handle it.
    """
    every = [task for task in tasks if task is not None]
    while pending := [task for task in every if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=RECANCEL_S)
    for task in every:
        err = None if task.cancelled() else task.exception()
        if err is not None:
            log.warning("background task %s ended with %r", task.get_name(), err)
