"""Admission control: every decision to accept a request or shed it, in one module.

Gates, cheapest first, so a request that will be refused costs as little as possible:

1. At the door (`Admission.shed_reason`, called by the middleware before any parsing): more
   requests in flight than `max_in_flight`, or an event loop running late (the CPU saturated:
   requests then queue as tasks in the loop, where no queue bound sees them) -> 503 with
   Retry-After. Health, metrics and other GETs are never shed.
2. At the queue (`check_queue`, called by the batcher when a sample is queued): the queue is
   full, or the queue ahead is so long that the sample would miss its deadline -> 503.
3. The deadline itself (`remaining_s`): counted from arrival; a request not answered by then
   gets 504.

`Arrivals` counts requests admitted but not yet queued, so a batcher waits for company only
while somebody is on the way. Each admitted request holds one `Ticket`
(`request.state.admission`): the route calls `ticket.queued()` once its samples are queued, and
the middleware `release()`s it when the request ends, whatever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from dlpipe.serving.errors import Overloaded


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


class Arrivals:
    """Requests on their way to a batcher: admitted by the server, not yet queued.

    A batcher waits `max_wait` for company only while somebody is on the way, so a lone request
    (one client, a quiet server) runs at once instead of idling for the window.
    """

    def __init__(self) -> None:
        self.count = 0
        self._listeners: list[asyncio.Event] = []

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count <= 0:
            self.count = 0
            for event in self._listeners:
                event.set()  # nobody else is coming: stop waiting for a fuller batch

    def listen(self, event: asyncio.Event) -> None:
        """Set `event` whenever the last request on its way has arrived."""
        self._listeners.append(event)

    def unlisten(self, event: asyncio.Event) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(event)

    @property
    def listeners(self) -> int:
        """Batchers listening (a closed batcher no longer does)."""
        return len(self._listeners)


class Ticket:
    """One admitted request: on its way until `queued()`, in flight until `release()`."""

    __slots__ = ("_admission", "_on_the_way", "_released")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._on_the_way = True
        self._released = False
        admission.in_flight += 1
        admission.arrivals.enter()

    def queued(self) -> None:
        """Its samples are in a batcher's queue: no longer on the way (idempotent)."""
        if self._on_the_way:
            self._on_the_way = False
            self._admission.arrivals.leave()

    def release(self) -> None:
        """The request ended, answered or not (idempotent)."""
        self.queued()
        if not self._released:
            self._released = True
            self._admission.in_flight -= 1


class Admission:
    """The server's door: how many requests are in, and whether one more may come in.

    Args:
        max_in_flight: inference requests handled at once; beyond it new ones get 503.
        max_lag_s: shed new inference requests while the event loop runs this late.
        lag: the loop-lag monitor (started by the app's lifespan); None: no lag shedding.
    """

    def __init__(
        self, max_in_flight: int, max_lag_s: float, lag: LoopLagMonitor | None = None
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_lag_s = max_lag_s
        self.lag = lag
        self.arrivals = Arrivals()
        self.in_flight = 0

    def shed_reason(self) -> str | None:
        """Why a new inference request must be shed now, or None to admit it."""
        if self.in_flight >= self.max_in_flight:
            return f"{self.in_flight} requests in flight"
        if self.lag is not None and self.lag.lag_s > self.max_lag_s:
            return f"event loop {self.lag.lag_s * 1000:.0f} ms behind"
        return None

    def admit(self) -> Ticket:
        """Count one request in (see `Ticket`)."""
        return Ticket(self)


def check_queue(
    name: str,
    queued: int,
    capacity: int,
    expected_wait_s: float,
    timeout_s: float,
    per_item_s: float,
) -> None:
    """Refuse a sample that a batcher's queue cannot take or cannot answer within its deadline.

    Raises:
        Overloaded: the queue is full, or the expected wait exceeds `timeout_s`.
    """
    if queued >= capacity:
        raise Overloaded(
            f"model {name}: queue full ({queued} requests waiting)",
            retry_after_s=max(1.0, queued * per_item_s),
        )
    if expected_wait_s > timeout_s:
        raise Overloaded(
            f"model {name}: {queued} requests ahead; expected wait "
            f"{expected_wait_s * 1000:.0f} ms exceeds the {timeout_s * 1000:.0f} ms deadline",
            retry_after_s=expected_wait_s,
        )


def remaining_s(state: Any, timeout_s: float) -> float:
    """Seconds left before a request's deadline, counted from its arrival (`state.started`)."""
    started = getattr(state, "started", None)
    if started is None:
        return timeout_s
    return timeout_s - (time.perf_counter() - started)
