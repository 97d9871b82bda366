"""Which versions are loaded, how requests are routed, and hot swaps without a restart.

A swap follows the registry in three steps: load and warm up the new versions (off the event
loop), switch the routing snapshot in one assignment, then drain and close the versions no longer
routed to. Routing and queueing happen without an `await` in between, so no request is queued on
a batcher after it started draining, and none is answered by a version routed away from after the
switch. When a version fails to load, the previous snapshot keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dlpipe.monitoring import MetricsCollector
from dlpipe.routing import RoutingPlan
from dlpipe.serving.admission import Arrivals
from dlpipe.serving.errors import ModelUnavailable, VersionNotServed
from dlpipe.serving.served import ServedModel
from dlpipe.serving.settings import ServeSettings
from dlpipe.serving.sources import ModelSource

log = logging.getLogger(__name__)

RETRY_FAILED_AFTER_S = 30.0


@dataclass(frozen=True)
class ServingState:
    """An immutable snapshot: the routing plan and the loaded version for each of its versions."""

    plan: RoutingPlan
    models: dict[str, ServedModel]
    generation: int
    switched_at: float = field(default_factory=time.time)


class ModelManager:
    """Owns the served versions of one model name and follows its source."""

    def __init__(
        self,
        source: ModelSource,
        settings: ServeSettings,
        collector: MetricsCollector,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.source = source
        self.arrivals = arrivals
        self.settings = settings
        self.collector = collector
        self.state: ServingState | None = None
        self.last_error: str | None = None
        self._failed: dict[str, float] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_lock = asyncio.Lock()

    @property
    def model_name(self) -> str:
        return self.source.model_name

    @property
    def ready(self) -> bool:
        return self.state is not None

    # ----------------------------------------------------------------- routing
    def route(
        self, version: str | None = None, request_key: str | None = None
    ) -> tuple[ServedModel, str]:
        """The loaded version that answers this request, and why (for metrics)."""
        state = self.state
        if state is None:
            detail = f": {self.last_error}" if self.last_error else ""
            raise ModelUnavailable(f"no version of {self.model_name!r} is loaded yet{detail}")
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

    # --------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Load what the source says (failures leave the server unready), then follow it."""
        await self.refresh()
        self._refresh_task = asyncio.get_running_loop().create_task(
            self._follow(), name="registry-refresh"
        )

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_refresh_s)
            try:
                await self.refresh()
            except Exception:  # never let the follower die
                log.exception("registry refresh failed")

    async def refresh(self) -> bool:
        """Bring the served versions in line with the source; True when routing changed."""
        async with self._refresh_lock:
            try:
                plan = await asyncio.to_thread(self.source.plan)
            except Exception as err:
                self._fail("registry", f"reading the routing plan failed: {err}")
                return False
            current = self.state
            if current is not None and current.plan == plan:
                return False
            models = dict(current.models) if current is not None else {}
            loaded_now: list[ServedModel] = []
            for version in sorted(plan.versions - set(models)):
                served = await self._load(version)
                if served is None:
                    for extra in loaded_now:  # never routed to: drop them again
                        self._retire(extra)
                    return False  # keep serving the previous snapshot
                models[version] = served
                loaded_now.append(served)
            kept = {v: models[v] for v in plan.versions}
            generation = current.generation + 1 if current is not None else 1
            self.state = ServingState(plan, kept, generation)  # the atomic switch
            self.last_error = None
            log.info(
                "routing switched",
                extra={"event": "routing_switch", "generation": generation, **plan.to_dict()},
            )
            for version, served in models.items():
                if version not in kept:
                    self._retire(served)
            return True

    async def _load(self, version: str) -> ServedModel | None:
        failed_at = self._failed.get(version)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_AFTER_S:
            return None
        started = time.perf_counter()
        try:
            path = await asyncio.to_thread(self.source.fetch, version)
            served = await asyncio.to_thread(
                ServedModel.load,
                self.model_name,
                version,
                path,
                self.settings,
                self.collector,
                self.arrivals,
            )
        except Exception as err:
            log.exception("loading version %s of %r failed", version, self.model_name)
            self._failed[version] = time.monotonic()
            self._fail("model_load", f"version {version} of {self.model_name!r} failed: {err}")
            return None
        served.batcher.start()
        self._failed.pop(version, None)
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
        return served

    def _fail(self, error_type: str, message: str) -> None:
        self.last_error = message
        self.collector.record_error(error_type, message)

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
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        if self.state is not None:
            await asyncio.gather(*(m.batcher.close() for m in self.state.models.values()))
        if self._draining:
            await asyncio.gather(*self._draining)

    # -------------------------------------------------------------------- info
    def update_gauges(self) -> None:
        """Queue depth gauges, refreshed before each /metrics scrape."""
        if self.state is None:
            return
        for version, served in self.state.models.items():
            self.collector.set_queue(version, served.batcher.depth(), served.batcher.capacity)

    def describe(self) -> dict[str, Any]:
        state = self.state
        return {
            "model_name": self.model_name,
            "ready": state is not None,
            "generation": state.generation if state else 0,
            "routing": state.plan.to_dict() if state else None,
            "versions": [m.describe() for m in state.models.values()] if state else [],
            "last_error": self.last_error,
        }
