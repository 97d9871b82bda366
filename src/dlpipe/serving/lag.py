"""Event-loop lag: how long a ready callback waits before it runs.

When the CPU is the bottleneck, requests do not queue in the batcher but in the event loop
(every connection's request becomes a task waiting for its turn), where no queue bound sees
them. The lag of a periodic timer measures that hidden queue; the middleware sheds new
requests with 503 while it is above the limit, so accepted requests keep their deadline.
"""

from __future__ import annotations

import asyncio
import contextlib


class LoopLagMonitor:
    """Samples the event loop's scheduling delay every `interval_s` seconds."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling; call from inside the running loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        previous = 0.0
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval_s)
            sample = max(0.0, loop.time() - before - self.interval_s)
            # Two late samples in a row mean saturation; one alone is a pause (a collection,
            # a model swap) that is already over. Rise at once on a confirmed lag, decay over
            # a few samples: one quiet tick does not end an overload.
            lag = min(previous, sample)
            previous = sample
            self.lag_s = lag if lag > self.lag_s else 0.7 * self.lag_s + 0.3 * lag

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
