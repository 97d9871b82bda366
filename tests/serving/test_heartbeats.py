"""The server's heartbeat (in-process app): a switch is reported only once the version routed
away from has answered everything queued on it, and /models shows what was reported."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_helpers import make_biased_package, random_png, ready_client

from dlpipe.routing import Heartbeat, RoutingPlan, RoutingState
from dlpipe.serving import ServeSettings, create_app, heartbeats
from dlpipe.serving.heartbeats import interval_for
from dlpipe.serving.sources import LocalSource

SLOW_S = 0.3


class ReportingSource(LocalSource):
    """A local source that takes heartbeats as the registry does, and notes, at the moment
    each is written, whether the requests the test queued have all been answered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports: list[tuple[Heartbeat, bool]] = []
        self.withdrawn: list[str] = []
        self.watched: list[asyncio.Future[Any]] = []
        self.written = threading.Event()
        self.down = False
        self.hang: threading.Event | None = None
        self.calls = 0

    def report_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.calls += 1
        if self.hang is not None:
            self.hang.wait(30.0)  # a registry that does not answer
        if self.down:
            raise ConnectionError("registry down")
        answered = all(f.done() for f in self.watched)
        self.reports.append((heartbeat, answered))
        self.written.set()

    def withdraw_heartbeat(self, server_id: str) -> None:
        self.withdrawn.append(server_id)


@pytest.fixture
def app_and_source(serving_root: Path, base_onnx: Path) -> Iterator[tuple[TestClient, Any]]:
    root = serving_root / "heartbeat"
    packages = {v: make_biased_package(root, base_onnx, v, w) for v, w in {"1": 3, "2": 5}.items()}
    source = ReportingSource("fashion", packages, default_version="2")
    cfg = ServeSettings(model_name="fashion", registry_refresh_s=3600, access_log=False)
    with ready_client(create_app(cfg, source=source)) as client:
        yield client, source
    assert source.withdrawn == [source.reports[-1][0].server_id]  # a clean stop says goodbye


def _answer_version(client: TestClient) -> str:
    png = random_png(np.random.default_rng(1))
    r = client.post("/predict", files={"file": ("x.png", png, "image/png")})
    assert r.status_code == 200, r.text
    return str(r.json()["model_version"])


def _wait_for(event: threading.Event) -> None:
    assert event.wait(10.0), "no heartbeat written"
    event.clear()


def test_a_switch_is_reported_after_the_old_version_drained(
    app_and_source: tuple[TestClient, ReportingSource],
) -> None:
    client, source = app_and_source
    _wait_for(source.written)  # the first plan: version 2
    first, _ = source.reports[-1]
    manager = client.app.state.manager  # type: ignore[attr-defined]
    assert first.digest == RoutingPlan("fashion", RoutingState(champion="2")).digest
    assert first.generation == 1 and first.interval_s == interval_for(3600)

    old = manager.state.models["2"]
    run_batch = old.engine.predict_batch

    def slow(batch: Any) -> Any:
        time.sleep(SLOW_S)  # the rolled-back version still has work when routing switches
        return run_batch(batch)

    old.engine.predict_batch = slow
    sample = old.decoder.image(random_png(np.random.default_rng(0)))

    async def queue_then_switch() -> None:
        source.watched = [asyncio.ensure_future(old.infer(sample, 10.0)) for _ in range(6)]
        await asyncio.sleep(0.01)  # the first batch is running, the others wait for it
        source.set_plan("1")
        await manager.refresh()  # loads version 1, then switches (in the load or here)
        assert manager.state.plan.state.champion == "1"
        assert not all(f.done() for f in source.watched)  # switched while they were queued

    assert client.portal is not None
    client.portal.call(queue_then_switch)
    _wait_for(source.written)
    beat, answered = source.reports[-1]
    assert beat.digest == RoutingPlan("fashion", RoutingState(champion="1")).digest
    assert beat.generation == 2 and beat.plan is not None and beat.plan["champion"] == "1"
    assert answered, "reported before the version routed away from had answered its queue"
    assert [int(np.argmax(f.result())) for f in source.watched] == [5] * 6  # version 2's

    models = client.get("/models").json()
    assert models["plan_digest"] == beat.digest and models["generation"] == 2
    assert models["heartbeat"]["reported_digest"] == beat.digest
    assert (
        models["heartbeat"]["server_id"] == beat.server_id and models["heartbeat"]["error"] is None
    )


def test_a_failing_write_is_shown_and_serving_goes_on(
    app_and_source: tuple[TestClient, ReportingSource],
) -> None:
    client, source = app_and_source
    _wait_for(source.written)
    source.down = True
    source.set_plan("1")
    assert client.portal is not None
    client.portal.call(client.app.state.manager.refresh)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 10
    while client.get("/models").json()["heartbeat"]["error"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    models = client.get("/models").json()
    assert models["heartbeat"]["error"] == "heartbeat not written (ConnectionError)"
    assert models["routing"]["champion"] == "1"  # routing switched all the same
    source.down = False


def test_a_hanging_registry_holds_one_thread_not_more(
    app_and_source: tuple[TestClient, ReportingSource], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, source = app_and_source
    _wait_for(source.written)
    monkeypatch.setattr(heartbeats, "WRITE_TIMEOUT_S", 0.2)
    source.hang = threading.Event()
    calls = source.calls
    manager = client.app.state.manager  # type: ignore[attr-defined]
    assert client.portal is not None
    for champion in ("1", "2", "1", "2"):  # four switches, four reports while it hangs
        source.set_plan(champion)
        client.portal.call(manager.refresh)
        time.sleep(0.4)
    described = client.get("/models").json()["heartbeat"]
    assert described["error"] == "heartbeat not written (the previous write still hangs)"
    assert source.calls == calls + 1  # one write waits on the registry, no thread piles up
    assert _answer_version(client) == "2"  # serving never waited for it
    source.hang.set()  # the registry answers again: a report goes through once that write ends
    source.hang = None
    deadline = time.monotonic() + 10
    while client.get("/models").json()["heartbeat"]["error"] is not None:
        assert time.monotonic() < deadline
        client.portal.call(manager.heartbeat.report)
        time.sleep(0.05)
    assert source.reports[-1][0].plan["champion"] == "2"  # type: ignore[index]
