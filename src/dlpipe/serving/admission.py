"""Admission control: every decision to accept a request or shed it, in one module.

Gates, cheapest first, so a request that will be refused costs as little as possible:

1. At the door (`Admission.admit`, called by the middleware before any parsing): more
   requests in flight than `max_in_flight`, or an event loop running late (the CPU saturated:
   requests then queue as tasks in the loop, where no queue bound sees them) -> 503 with
   Retry-After; a declared body over the per-request limit -> 413, or one that would push the
   bytes held by all in-flight requests over their budget -> 503. Health, metrics and other
   GETs are never shed.
2. While the body arrives (`Ticket.receive`): the same two byte limits for bodies without a
   declared length, and a deadline for the whole body (slow senders get 408; one sweeper task
   checks the deadlines a few times a second).
3. At the queue (`check_queue`, called by the batcher when a sample is queued): the queue is
   full, or the queue ahead is so long that the sample would miss its deadline -> 503.
4. The deadline itself (`remaining_s`): counted from arrival; a request not answered by then
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

from starlette.types import Message, Receive

from dlpipe.serving.background import cancel_and_wait
from dlpipe.serving.errors import Overloaded, PayloadTooLarge, ServingError


class BodyTimeout(ServingError):
    """The request body did not arrive within `body_timeout_s`."""

    status_code = 408
    error_type = "request_timeout"


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
        await cancel_and_wait([self._task])
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
    """One admitted request: on its way until `queued()`, in flight until `release()`, holding
    the body bytes it has received (or declared) against the shared budget until then."""

    __slots__ = (
        "_admission",
        "_held",
        "_on_the_way",
        "_released",
        "_task",
        "deadline",
        "timed_out",
    )

    def __init__(self, admission: Admission, declared_bytes: int) -> None:
        self._admission = admission
        self._on_the_way = True
        self._released = False
        self._held = declared_bytes
        self._task: asyncio.Task[Any] | None = None
        self.deadline = 0.0
        self.timed_out = False
        admission.in_flight += 1
        admission.body_bytes += declared_bytes
        admission.arrivals.enter()

    def receive(self, receive: Receive, started: float) -> Receive:
        """`receive` with the body limits applied; the body deadline counts from `started`."""
        admission = self._admission
        limit = admission.max_body_bytes
        # Watched by the admission's sweeper until the body is complete (no timer per request).
        self._task = asyncio.current_task()
        self.deadline = started + admission.body_timeout_s
        admission.awaiting_body.add(self)
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the {limit} byte limit")
                if received > self._held:  # no (or a wrong) declared length: count as it comes
                    admission.body_bytes += received - self._held
                    self._held = received
                    admission.check_budget(0)
                if not message.get("more_body", False):
                    admission.awaiting_body.discard(self)
            else:
                admission.awaiting_body.discard(self)
            return message

        return limited

    def expire(self) -> None:
        """The body deadline passed: cancel the request (the middleware answers 408)."""
        self._admission.awaiting_body.discard(self)
        if self._task is not None and not self._task.done():
            self.timed_out = True
            self._task.cancel()

    def queued(self) -> None:
        """Its samples are in a batcher's queue: no longer on the way (idempotent)."""
        if self._on_the_way:
            self._on_the_way = False
            self._admission.arrivals.leave()

    def release(self) -> None:
        """The request ended, answered or not (idempotent)."""
        self.queued()
        self._admission.awaiting_body.discard(self)
        if not self._released:
            self._released = True
            self._admission.in_flight -= 1
            self._admission.body_bytes -= self._held


class Admission:
    """The server's door: how many requests (and body bytes) are in, and whether one more may
    come in.

    Args:
        max_in_flight: inference requests handled at once; beyond it new ones get 503.
        max_lag_s: shed new inference requests while the event loop runs this late.
        lag: the loop-lag monitor (started by the app's lifespan); None: no lag shedding.
        max_body_bytes: largest body of one request (413 beyond).
        body_budget_bytes: bytes all in-flight requests may hold together (503 beyond).
        body_timeout_s: time allowed for a whole body to arrive (408 beyond).
    """

    def __init__(
        self,
        max_in_flight: int,
        max_lag_s: float,
        lag: LoopLagMonitor | None = None,
        *,
        max_body_bytes: int = 10 * 1024 * 1024,
        body_budget_bytes: int = 256 * 1024 * 1024,
        body_timeout_s: float = 30.0,
    ) -> None:
        self.max_in_flight = max_in_flight
        self.max_lag_s = max_lag_s
        self.lag = lag
        self.max_body_bytes = max_body_bytes
        self.body_budget_bytes = body_budget_bytes
        self.body_timeout_s = body_timeout_s
        self.arrivals = Arrivals()
        self.in_flight = 0
        self.body_bytes = 0
        self.awaiting_body: set[Ticket] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def start(self, every_s: float = 0.25) -> None:
        """Watch body deadlines (call from inside the running loop): a few checks a second
        instead of a timer per request."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(every_s), name="body-deadlines"
            )

    async def _sweep(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            now = time.perf_counter()
            for ticket in [t for t in self.awaiting_body if t.deadline <= now]:
                ticket.expire()

    async def stop(self) -> None:
        await cancel_and_wait([self._sweeper])
        self._sweeper = None

    def shed_reason(self) -> str | None:
        """Why a new inference request must be shed now, or None to admit it.

        A late loop sheds only while requests are in flight: they are what a late loop queues.
        With none, the lateness comes from elsewhere (another process on the CPU, a pause),
        refusing the one request would relieve nothing, and a lone client would be refused for
        as long as the machine stays busy.
        """
        if self.in_flight >= self.max_in_flight:
            return f"{self.in_flight} requests in flight"
        if self.lag is not None and self.in_flight > 0 and self.lag.lag_s > self.max_lag_s:
            return f"event loop {self.lag.lag_s * 1000:.0f} ms behind"
        return None

    def check_budget(self, more: int) -> None:
        """Overloaded when `more` bytes would push the in-flight bodies over their budget."""
        if self.body_bytes + more > self.body_budget_bytes:
            raise Overloaded(
                f"server busy: in-flight request bodies hold {self.body_bytes} bytes "
                f"(budget {self.body_budget_bytes}); retry later",
                retry_after_s=1.0,
            )

    def admit(self, declared_bytes: int | None = None) -> Ticket:
        """Count one inference request in (see `Ticket`), or refuse it.

        Raises:
            Overloaded: too many in flight, a late event loop, or no room in the body budget.
            PayloadTooLarge: the declared body is over the per-request limit.
        """
        busy = self.shed_reason()
        if busy is not None:
            raise Overloaded(f"server busy: {busy}; retry later", retry_after_s=1.0)
        declared = declared_bytes or 0
        if declared > self.max_body_bytes:
            raise PayloadTooLarge(
                f"request body of {declared} bytes exceeds the {self.max_body_bytes} byte limit"
            )
        self.check_budget(declared)
        return Ticket(self, declared)


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
