"""The server's heartbeat: tell the registry which routing this process answers with.

After every routing switch, once the versions routed away from have drained (so no request
routed under the old plan can still be answered), and every `interval_s` besides, the
`HeartbeatReporter` writes a `dlpipe.routing.Heartbeat` through its source (the registry: see
`dlpipe.tracking.heartbeats`). `dlpipe registry promote|ab|rollback|canary --wait` waits for
these. A clean stop removes this server's heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from dlpipe.routing import Heartbeat, RoutingPlan
from dlpipe.serving.background import cancel_and_wait

log = logging.getLogger(__name__)

WRITE_TIMEOUT_S = 10.0


class Switching(Protocol):
    """What the reporter reads from the `ModelManager`."""

    @property
    def applied(self) -> tuple[RoutingPlan, int] | None: ...

    async def drained(self) -> None: ...


def new_server_id() -> str:
    """`host-pid-xxxx`: unique per process, readable in a laggard list."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"


def interval_for(refresh_s: float) -> float:
    """Heartbeat period: 5 registry polls, within [1, 30] s (a live heartbeat expires after 3)."""
    return min(30.0, max(1.0, 5.0 * refresh_s))


class HeartbeatReporter:
    """Writes this server's heartbeat after each drained switch and periodically."""

    def __init__(
        self,
        manager: Switching,
        report: Callable[[Heartbeat], None],
        withdraw: Callable[[str], None] | None = None,
        interval_s: float = 10.0,
    ) -> None:
        self.manager = manager
        self.server_id = new_server_id()
        self.interval_s = interval_s
        self.last: Heartbeat | None = None
        """The last heartbeat written."""
        self.error: str | None = None
        """Why the last write failed (None once one works)."""
        self._report = report
        self._withdraw = withdraw
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._periodic: asyncio.Task[None] | None = None
        self._writing: asyncio.Future[None] | None = None

    def start(self) -> None:
        if self._periodic is None:
            self._periodic = asyncio.get_running_loop().create_task(
                self._every_interval(), name="heartbeat"
            )

    def switched(self) -> None:
        """Routing just switched: report it once the retired versions have drained."""
        self._spawn(self.report())

    async def report(self) -> None:
        """Write the heartbeat of the plan applied now, after what it replaced has drained."""
        async with self._lock:  # one write at a time: the newest state is written last
            applied = self.manager.applied
            if applied is None:
                return
            await self.manager.drained()
            if self.manager.applied != applied:
                return  # switched again meanwhile: that switch reports itself
            plan, generation = applied
            beat = Heartbeat(
                self.server_id,
                generation,
                plan.digest,
                plan.to_dict(),
                interval_s=self.interval_s,
            )
            if self._writing is not None and not self._writing.done():
                # The registry hangs (its client retries for minutes): one thread waits on it,
                # never more, so loads and plan reads keep threads to run on.
                self.error = "heartbeat not written (the previous write still hangs)"
                return
            self._writing = asyncio.ensure_future(asyncio.to_thread(self._report, beat))
            try:
                await asyncio.wait_for(asyncio.shield(self._writing), WRITE_TIMEOUT_S)
            except Exception as err:
                if self.error is None:
                    log.warning("writing the heartbeat failed: %r", err)
                self.error = f"heartbeat not written ({type(err).__name__})"
                return
            self.last, self.error = beat, None

    async def stop(self) -> None:
        """Stop reporting and remove this server's heartbeat (bounded: the store may be gone)."""
        await cancel_and_wait([self._periodic, *self._tasks])
        writing = self._writing is not None and not self._writing.done()
        if self._withdraw is not None and self.last is not None and not writing:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    asyncio.to_thread(self._withdraw, self.server_id), WRITE_TIMEOUT_S
                )

    def describe(self) -> dict[str, Any]:
        """What /models shows: who this server is and what it last told the registry."""
        last = self.last
        return {
            "server_id": self.server_id,
            "interval_s": self.interval_s,
            "reported_digest": last.digest if last else None,
            "reported_generation": last.generation if last else None,
            "reported_s_ago": round(time.time() - last.time, 2) if last else None,
            "error": self.error,
        }

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.report()
            except Exception:  # never let the heartbeat die
                log.exception("heartbeat failed")

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
