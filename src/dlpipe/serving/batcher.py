"""The micro-batcher: concurrent callers `await submit(x)`, the model sees one batch.

    batcher = MicroBatcher(run_batch, max_batch_size=32, max_wait_s=0.002, capacity=512)
    batcher.start()                      # inside the running event loop
    y = await batcher.submit(x, timeout_s=1.0)
    await batcher.close()                # drains what is queued, then stops

Inside: a bounded deque of pending requests (one future each), a "full batch" event, and a
max-wait timeout counted from when the oldest request arrived; with an `Arrivals` count the
wait is skipped (or cut short) when no other request is on its way. A batch runs on a
dedicated thread so the event loop keeps accepting requests meanwhile.

One bad request must not fail its neighbours: only items with the same `signature` (shapes and
dtypes) are batched together, and a batch that raises is split in halves and run again until
the failing items stand alone; only their futures get the exception.
A full queue, or a queue so long that a new request would miss its deadline, is refused at once
by `dlpipe.serving.admission.check_queue` (HTTP 503 + Retry-After) instead of letting latency
grow without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from dlpipe.monitoring.tracing import BatchTiming
from dlpipe.serving.admission import Arrivals, check_queue
from dlpipe.serving.errors import BatcherClosed, DeadlineExceeded

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    item: Any
    future: asyncio.Future[Any]
    enqueued_at: float
    deadline: float
    timing: BatchTiming | None = None


@dataclass(frozen=True, slots=True)
class BatchStats:
    """What one batch did, handed to the `on_batch` callback (metrics)."""

    size: int
    queue_waits_s: tuple[float, ...]
    inference_s: float
    expired: int


def _closed(items: list[Any]) -> Sequence[Any]:
    raise BatcherClosed("batcher closed")


class MicroBatcher(Generic[T, R]):
    """Collect concurrent requests into batches for a blocking `run_batch(items) -> results`."""

    def __init__(
        self,
        run_batch: Callable[[list[T]], Sequence[R]],
        *,
        max_batch_size: int = 32,
        max_wait_s: float = 0.002,
        capacity: int = 512,
        name: str = "model",
        on_batch: Callable[[BatchStats], None] | None = None,
        arrivals: Arrivals | None = None,
        signature: Callable[[T], Hashable] | None = None,
    ) -> None:
        if max_batch_size < 1 or capacity < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and capacity must be >= 1, max_wait_s >= 0")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.capacity = capacity
        self.name = name
        self.on_batch = on_batch
        self.arrivals = arrivals
        self.signature = signature
        self._pending: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{name}")
        self._busy_until = 0.0  # loop time the batch in progress is expected to end
        self._running = False  # a batch is on the inference thread
        self.per_item_s = 0.0  # moving average of inference time per item (admission control)
        self.batches_run = 0
        self.items_run = 0

    # --------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the batching task; call from inside the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"batcher-{self.name}"
            )
            if self.arrivals is not None:
                self.arrivals.listen(self._full)

    @property
    def closing(self) -> bool:
        return self._closing

    def depth(self) -> int:
        """Requests waiting for a batch."""
        return len(self._pending)

    async def close(self) -> None:
        """Stop accepting requests, finish every queued one, then release the thread."""
        self._closing = True
        if self.arrivals is not None:
            self.arrivals.unlisten(self._full)
        self._wakeup.set()
        self._full.set()
        if self._task is not None:
            await asyncio.shield(self._task)
        self._executor.shutdown(wait=False)
        # The callbacks usually point back at our owner (a served model holding this batcher):
        # drop them so a retired model is freed at once, not at a full collection (which never
        # comes for objects the server froze at start-up).
        self.run_batch = _closed
        self.on_batch = None

    # ------------------------------------------------------------------ submit
    def submit_nowait(
        self, item: T, timeout_s: float, timing: BatchTiming | None = None
    ) -> asyncio.Future[R]:
        """Queue one request now and return its future (no await: routing + queueing are atomic).

        `timing` (tracing): filled with when its batch ran and how many it held.
        """
        if self._closing:
            raise BatcherClosed(self.name)
        loop = asyncio.get_running_loop()
        now = loop.time()
        queued = len(self._pending)
        if queued == 0 and not self._running:
            # Nothing ahead: always let it through. The estimate below only learns from batches
            # that run, so one slow batch (a worker restart, a cold start) must not make it
            # refuse every later request, and this one refreshes it.
            expected_wait = 0.0
        else:
            expected_wait = max(0.0, self._busy_until - now) + (queued + 1) * self.per_item_s
        check_queue(self.name, queued, self.capacity, expected_wait, timeout_s, self.per_item_s)
        future: asyncio.Future[R] = loop.create_future()
        if timing is not None:
            timing.queued_ns = time.time_ns()
        self._pending.append(_Pending(item, future, now, now + timeout_s, timing))
        self._wakeup.set()
        if len(self._pending) >= self.max_batch_size:
            self._full.set()
        return future

    async def submit(self, item: T, timeout_s: float = 1.0) -> R:
        """Run `item` in the next batch; `DeadlineExceeded` if no answer within `timeout_s`."""
        future = self.submit_nowait(item, timeout_s)
        try:
            return await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"model {self.name}: no answer within {timeout_s * 1000:.0f} ms"
            ) from None

    # -------------------------------------------------------------------- loop
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if (
                    len(self._pending) < self.max_batch_size
                    and not self._closing
                    and (self.arrivals is None or self.arrivals.count > 0)
                ):
                    # Wait for a full batch, at most max_wait after the oldest arrived.
                    remaining = self._pending[0].enqueued_at + self.max_wait_s - loop.time()
                    if remaining > 0:
                        self._full.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._full.wait(), remaining)
                await self._run(self._take_batch(), loop)
        finally:
            # Only reached with requests left if the task was cancelled: fail them, never hang them.
            while self._pending:
                p = self._pending.popleft()
                if not p.future.done():
                    p.future.set_exception(BatcherClosed(self.name))

    def _take_batch(self) -> list[_Pending]:
        """Up to `max_batch_size` pending items, oldest first, all of the oldest's signature."""
        pending = self._pending
        take = min(self.max_batch_size, len(pending))
        if self.signature is None:
            return [pending.popleft() for _ in range(take)]
        wanted = self.signature(pending[0].item)
        batch: list[_Pending] = []
        others: list[_Pending] = []
        while pending and len(batch) < self.max_batch_size:
            p = pending.popleft()
            (batch if self.signature(p.item) == wanted else others).append(p)
        pending.extendleft(reversed(others))  # the rest keep their place in line
        return batch

    def _timed(self, items: list[Any], timing: list[float]) -> list[tuple[bool, Any]]:
        started = time.perf_counter()
        try:
            return self._isolated(items)
        finally:
            timing[0] = time.perf_counter() - started

    def _isolated(self, items: list[Any]) -> list[tuple[bool, Any]]:
        """(ok, result or exception) per item; a failing batch is bisected down to the culprits."""
        try:
            results = self.run_batch(items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"model {self.name}: batch of {len(items)} returned {len(results)} results"
                )
            return [(True, r) for r in results]
        except Exception as err:
            if len(items) == 1:
                log.error("inference failed on %s", self.name, exc_info=err)
                return [(False, err)]
            half = len(items) // 2
            return self._isolated(items[:half]) + self._isolated(items[half:])

    async def _run(self, batch: list[_Pending], loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        live, expired = [], 0
        for p in batch:
            if p.future.done():  # the caller gave up (deadline or disconnect)
                continue
            if p.deadline <= now:
                expired += 1
                p.future.set_exception(
                    DeadlineExceeded(f"model {self.name}: deadline passed while queued")
                )
                continue
            live.append(p)
        if not live:
            return
        waits = tuple(now - p.enqueued_at for p in live)
        self._busy_until = now + self.per_item_s * len(live)
        timing = [0.0]
        traced = [p.timing for p in live if p.timing is not None]
        started_ns = time.time_ns() if traced else 0
        self._running = True
        try:
            outcomes = await loop.run_in_executor(
                self._executor, self._timed, [p.item for p in live], timing
            )
        except Exception as err:  # the executor itself failed (shut down): fail them all
            outcomes = [(False, err)] * len(live)
        finally:
            self._running = False
        if traced:
            ended_ns = time.time_ns()
            for t in traced:
                t.started_ns, t.ended_ns, t.batch_size = started_ns, ended_ns, len(live)
        for p, (ok, value) in zip(live, outcomes, strict=True):
            if p.future.done():
                continue
            if ok:
                p.future.set_result(value)
            else:
                p.future.set_exception(value)
        elapsed = timing[0]  # measured on the worker thread: excludes event-loop scheduling
        self._busy_until = 0.0
        per_item = elapsed / len(live)
        first = self.batches_run == 0
        self.per_item_s = per_item if first else 0.8 * self.per_item_s + 0.2 * per_item
        self.batches_run += 1
        self.items_run += len(live)
        if self.on_batch is not None:
            try:
                self.on_batch(BatchStats(len(live), waits, elapsed, expired))
            except Exception:
                log.exception("on_batch callback failed")
