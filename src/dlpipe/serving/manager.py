"""Which versions are loaded, how requests are routed, and hot swaps without a restart.

The manager follows its source (the registry): each refresh reads the wanted `RoutingPlan` and
starts loading, each in its own task, the versions it does not hold yet. Whenever the versions
of the wanted plan are loaded, routing switches to it in one assignment of an immutable
snapshot; versions no longer routed to then drain and close. Routing and queueing happen without
an `await` in between, so no request is queued on a batcher after it started draining.

Faults stay contained:
- a version that fails to load (or takes longer than `model_load_timeout_s`) is reported
  (`/models`, `/ready`, the `model_load` error count) and retried with exponential back-off;
  the plan's healthy versions serve meanwhile: an A/B split with a broken side sends all its
  traffic to the other side;
- a load in progress never holds up a switch to versions already loaded (a rollback waits only
  for its own target);
- a registry that cannot be read leaves the last plan serving.

A source that takes heartbeats (the registry) is told, after each switch has drained, which
plan this server applies (`dlpipe.serving.heartbeats`): that is how `--wait` knows a change
has landed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dlpipe.monitoring import MetricsCollector
from dlpipe.routing import RoutingPlan, RoutingState
from dlpipe.serving.admission import Arrivals
from dlpipe.serving.background import cancel_and_wait
from dlpipe.serving.errors import ModelUnavailable, VersionNotServed
from dlpipe.serving.heartbeats import HeartbeatReporter, interval_for
from dlpipe.serving.served import ServedModel
from dlpipe.serving.settings import ServeSettings
from dlpipe.serving.sources import ModelSource

log = logging.getLogger(__name__)

FIRST_RETRY_S = 5.0
MAX_RETRY_S = 300.0


@dataclass(frozen=True)
class ServingState:
    """An immutable snapshot: the plan routing applies and the loaded version for each of its
    versions. `wanted` is the source's plan when a degraded form of it is applied."""

    plan: RoutingPlan
    models: dict[str, ServedModel]
    generation: int
    wanted: RoutingPlan | None = None
    switched_at: float = field(default_factory=time.time)


@dataclass
class LoadFailure:
    """Why a version is not served, and when it is tried again."""

    reason: str
    attempts: int
    retry_at: float

    def describe(self) -> dict[str, Any]:
        retry_in = max(0.0, self.retry_at - time.monotonic())
        return {"reason": self.reason, "attempts": self.attempts, "retry_in_s": round(retry_in, 1)}


def degrade(plan: RoutingPlan, available: set[str]) -> RoutingPlan:
    """The part of `plan` that `available` versions can serve (all traffic to what is left)."""
    state = plan.state
    if state.ab is not None:
        sides = [v for v in (state.ab.model_a_version, state.ab.model_b_version) if v in available]
        if len(sides) == 1:
            return RoutingPlan(plan.model_name, RoutingState(champion=sides[0]))
    return plan


class ModelManager:
    """Owns the served versions of one model name and follows its source."""

    def __init__(
        self,
        source: ModelSource,
        settings: ServeSettings,
        collector: MetricsCollector,
        arrivals: Arrivals | None = None,
        on_first_ready: Callable[[], None] | None = None,
    ) -> None:
        self.source = source
        self.arrivals = arrivals
        self.settings = settings
        self.collector = collector
        self.state: ServingState | None = None
        self.wanted: RoutingPlan | None = None
        self.registry_error: str | None = None
        """Why the last plan read failed (None once it works again); short, for clients."""
        self.failures: dict[str, LoadFailure] = {}
        self._loaded: dict[str, ServedModel] = {}
        self._loading: dict[str, asyncio.Task[ServedModel | None]] = {}
        self._plan_read: asyncio.Task[RoutingPlan] | None = None
        self._draining: set[asyncio.Task[None]] = set()
        self._follow_task: asyncio.Task[None] | None = None
        self._on_first_ready = on_first_ready
        report = getattr(source, "report_heartbeat", None)
        self.heartbeat: HeartbeatReporter | None = None
        if report is not None:
            self.heartbeat = HeartbeatReporter(
                self,
                report,
                getattr(source, "withdraw_heartbeat", None),
                interval_for(settings.registry_refresh_s),
            )

    @property
    def model_name(self) -> str:
        return self.source.model_name

    @property
    def ready(self) -> bool:
        return self.state is not None

    @property
    def applied(self) -> tuple[RoutingPlan, int] | None:
        """(plan, generation) routing applies now; None before the first plan."""
        state = self.state
        return None if state is None else (state.plan, state.generation)

    async def drained(self) -> None:
        """Return once every version routed away from so far has answered what it queued."""
        while pending := {task for task in self._draining if not task.done()}:
            await asyncio.wait(pending)

    # ----------------------------------------------------------------- routing
    def route(
        self, version: str | None = None, request_key: str | None = None
    ) -> tuple[ServedModel, str]:
        """The loaded version that answers this request, and why (for metrics)."""
        state = self.state
        if state is None:
            raise ModelUnavailable(
                f"no version of {self.model_name!r} is loaded yet ({self.not_ready_reason()})",
                retry_after_s=1.0,
            )
        if version is not None:
            served = state.models.get(version)
            if served is None:
                raise VersionNotServed(
                    f"version {version!r} of {self.model_name!r} is not served; "
                    f"served versions: {sorted(state.models)}"
                )
            route = "pinned"
        else:
            chosen, route = state.plan.choose(request_key)
            served = state.models[chosen]
        self.collector.record_route(self.model_name, served.version, route)
        return served, route

    def not_ready_reason(self) -> str:
        """A short reason for clients (details are in the log)."""
        if self.registry_error is not None and self.wanted is None:
            return self.registry_error
        failed = sorted(
            v for v in (self.wanted.versions if self.wanted else ()) if v in self.failures
        )
        if failed:
            return f"version(s) {', '.join(failed)} failed to load; retrying"
        return "models are loading"

    # --------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Follow the source in the background (returns at once: /health answers meanwhile)."""
        if self._follow_task is None:
            self._follow_task = asyncio.get_running_loop().create_task(
                self._follow(), name="registry-follow"
            )
            if self.heartbeat is not None:
                self.heartbeat.start()

    async def _follow(self) -> None:
        while True:
            try:
                await self.refresh(wait=False)
            except Exception:  # never let the follower die
                log.exception("registry refresh failed")
            await asyncio.sleep(self.settings.registry_refresh_s)

    async def refresh(self, wait: bool = True) -> bool:
        """Read the source's plan, load what it needs, switch when possible.

        Args:
            wait: also wait for the loads this plan needs (bounded by the load timeout).
                The background follower does not: a slow load never delays its next read.

        Returns:
            True when routing switched.
        """
        plan = await self._read_plan()
        if plan is None:
            return False
        self.wanted = plan
        loads = [self._ensure_loading(v) for v in sorted(plan.versions)]
        if wait:
            pending = [task for task in loads if task is not None]
            if pending:
                await asyncio.wait(pending)
        return self._apply()

    async def _read_plan(self) -> RoutingPlan | None:
        if self._plan_read is None or self._plan_read.done():
            # One read at a time: a registry that hangs does not pile up threads.
            self._plan_read = asyncio.ensure_future(asyncio.to_thread(self.source.plan))
        timeout = max(5.0, 5 * self.settings.registry_refresh_s)
        try:
            plan = await asyncio.wait_for(asyncio.shield(self._plan_read), timeout)
        except Exception as err:
            kind = "timed out" if isinstance(err, TimeoutError) else type(err).__name__
            reason = f"registry unreachable ({kind}); serving the last plan"
            if self.registry_error is None:
                log.warning("reading the routing plan failed: %r", err, exc_info=err)
            self.registry_error = reason
            self.collector.record_error("registry", f"reading the routing plan failed: {err!r}")
            return None
        if self.registry_error is not None:
            log.info("registry reachable again", extra={"event": "registry_recovered"})
        self.registry_error = None
        return plan

    def _ensure_loading(self, version: str) -> asyncio.Task[ServedModel | None] | None:
        """The load task of `version`, started if needed; None when loaded or backing off."""
        if version in self._loaded:
            return None
        task = self._loading.get(version)
        if task is not None:
            return task
        failure = self.failures.get(version)
        if failure is not None and time.monotonic() < failure.retry_at:
            return None
        task = asyncio.get_running_loop().create_task(self._load(version), name=f"load-{version}")
        self._loading[version] = task
        return task

    async def _load(self, version: str) -> ServedModel | None:
        started = time.perf_counter()
        work = asyncio.ensure_future(asyncio.to_thread(self._build, version))
        try:
            served = await asyncio.wait_for(
                asyncio.shield(work), self.settings.model_load_timeout_s
            )
        except Exception as err:
            if isinstance(err, TimeoutError):
                reason = f"timed out after {self.settings.model_load_timeout_s:g} s"
                log.error("loading version %s of %r %s", version, self.model_name, reason)
            else:
                reason = f"load failed ({type(err).__name__})"
                log.error("loading version %s of %r failed", version, self.model_name, exc_info=err)
            self._record_failure(version, reason, repr(err))
            return None
        finally:
            self._loading.pop(version, None)
        served.batcher.start()
        self._loaded[version] = served
        self.failures.pop(version, None)
        self.collector.set_model_info(self.model_name, version, served.framework, served.precision)
        self.collector.set_queue(version, 0, self.settings.queue_capacity)
        log.info(
            "model loaded",
            extra={
                "event": "model_loaded",
                "model_version": version,
                "framework": served.framework,
                "load_s": round(time.perf_counter() - started, 3),
            },
        )
        self._apply()
        return served

    def _build(self, version: str) -> ServedModel:
        """Fetch and warm up one version (blocking: runs on a worker thread)."""
        path = self.source.fetch(version)
        return ServedModel.load(
            self.model_name, version, path, self.settings, self.collector, self.arrivals
        )

    def _record_failure(self, version: str, reason: str, detail: str) -> None:
        previous = self.failures.get(version)
        attempts = previous.attempts + 1 if previous else 1
        delay = min(MAX_RETRY_S, FIRST_RETRY_S * 2 ** (attempts - 1))
        self.failures[version] = LoadFailure(reason, attempts, time.monotonic() + delay)
        self.collector.record_error("model_load", f"version {version}: {detail}")

    def _apply(self) -> bool:
        """Switch routing to the wanted plan, or to the part of it that is loaded."""
        wanted = self.wanted
        if wanted is None:
            return False
        available = {v for v in wanted.versions if v in self._loaded}
        plan = degrade(wanted, available)
        current = self.state
        if not plan.versions <= available or (current is not None and current.plan == plan):
            # Nothing to switch (e.g. a promotion whose version is still loading: keep serving).
            self._retire_unused()
            return False
        models = {v: self._loaded[v] for v in plan.versions}
        generation = current.generation + 1 if current is not None else 1
        self.state = ServingState(plan, models, generation, wanted if plan != wanted else None)
        log.info(
            "routing switched",
            extra={"event": "routing_switch", "generation": generation, **plan.to_dict()},
        )
        if current is None and self._on_first_ready is not None:
            self._on_first_ready()
        self._retire_unused()
        if self.heartbeat is not None:
            self.heartbeat.switched()  # written once the versions just retired have drained
        return True

    def _retire_unused(self) -> None:
        """Close loaded versions that neither the wanted plan nor current routing uses."""
        keep = set(self.wanted.versions if self.wanted else ()) | set(
            self.state.models if self.state else ()
        )
        for version in [v for v in self._loaded if v not in keep]:
            self._retire(self._loaded.pop(version))

    def _retire(self, served: ServedModel) -> None:
        """Drain a version routed away from in the background, then forget it."""

        async def drain() -> None:
            await served.batcher.close()
            self.collector.remove_model_info(
                self.model_name, served.version, served.framework, served.precision
            )
            extra = {"event": "model_retired", "model_version": served.version}
            log.info("model retired", extra=extra)

        task = asyncio.get_running_loop().create_task(drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def stop(self) -> None:
        """Stop following the source and close every batcher (queued requests finish first)."""
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        await cancel_and_wait([self._follow_task, *self._loading.values()])
        await asyncio.gather(*(m.batcher.close() for m in self._loaded.values()))
        if self._draining:
            await asyncio.gather(*self._draining)

    # -------------------------------------------------------------------- info
    def update_gauges(self) -> None:
        """Queue depth gauges, refreshed before each /metrics scrape."""
        if self.state is None:
            return
        for version, served in self.state.models.items():
            self.collector.set_queue(version, served.batcher.depth(), served.batcher.capacity)

    def unavailable(self) -> dict[str, str]:
        """Versions the wanted plan names that do not serve, and why (short reasons)."""
        wanted = self.wanted.versions if self.wanted is not None else frozenset()
        out = {v: f.reason for v, f in self.failures.items() if v in wanted}
        out.update({v: "loading" for v in self._loading if v in wanted})
        return dict(sorted(out.items()))

    def describe(self) -> dict[str, Any]:
        state = self.state
        return {
            "model_name": self.model_name,
            "ready": state is not None,
            "generation": state.generation if state else 0,
            "plan_digest": state.plan.digest if state else None,
            "heartbeat": self.heartbeat.describe() if self.heartbeat is not None else None,
            "routing": state.plan.to_dict() if state else None,
            "wanted_routing": state.wanted.to_dict() if state and state.wanted else None,
            "versions": [m.describe() for m in state.models.values()] if state else [],
            "failed_versions": {v: f.describe() for v, f in sorted(self.failures.items())},
            "loading_versions": sorted(self._loading),
            "registry_error": self.registry_error,
        }


YOUNG_GC_THRESHOLD = 10_000
"""Allocations between two collections of the youngest generation (CPython's default: 700)."""


def freeze_startup_heap() -> None:
    """Move the long-lived objects loaded so far out of the cyclic collector.

    The libraries and the first model leave ~250k long-lived objects; a full collection walks
    them all (~100 ms, a p99 spike under load). Freezing them once the first version serves
    keeps full collections short.

    The youngest generation is collected every `YOUNG_GC_THRESHOLD` allocations instead of
    700: each answered request leaves a few objects queued for the prediction log's writer
    until its next drain, and at 700 they set off a collection every few requests (15 us per
    request of event-loop time in the CNN benchmark, docs/benchmarks.md). The objects are
    freed by reference counting soon after; the collector only has to find cycles, and the
    request path makes none.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)
