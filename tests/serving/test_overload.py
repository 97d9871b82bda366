"""Load shedding: the in-flight cap and the event-loop lag check answer 503 + Retry-After
before any parsing; the settings that drive them; the open-loop load generator that measures it.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import time
import weakref
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_helpers import random_png, ready_client

from dlpipe.monitoring import MetricsCollector
from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.admission import Admission, LoopLagMonitor
from dlpipe.serving.middleware import RequestContextMiddleware
from dlpipe.serving.security import Guard
from loadgen import run_open_loop

# Latency or timing is part of what is asserted: run alone, after the parallel part of the suite.
pytestmark = pytest.mark.serial


def run_async(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body in a fresh event loop (no async pytest plugin needed)."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return wrapper


class _GatedApp:
    """An inner ASGI app whose POSTs wait until the test opens the gate."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.entered += 1
        if scope["method"] == "POST":
            await self.gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def _shedding(
    inner: Any, max_in_flight: int = 256, max_lag_s: float = 0.1, lag: LoopLagMonitor | None = None
) -> RequestContextMiddleware:
    admission = Admission(max_in_flight, max_lag_s, lag, max_body_bytes=1 << 20)
    return RequestContextMiddleware(
        inner, collector=MetricsCollector(), access_log=False, admission=admission, guard=Guard([])
    )


@run_async
async def test_requests_beyond_the_in_flight_cap_get_503_at_once() -> None:
    inner = _GatedApp()
    app = _shedding(inner, max_in_flight=2)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        held = [asyncio.create_task(client.post("/predict", content=b"x")) for _ in range(2)]
        while inner.entered < 2:
            await asyncio.sleep(0.001)
        started = time.perf_counter()
        shed = await client.post("/predict", content=b"x")
        shed_s = time.perf_counter() - started
        assert inner.entered == 2  # the third request never reached the app
        health = asyncio.create_task(client.get("/health"))  # GETs are not shed
        inner.gate.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        assert (await health).status_code == 200
        after = await client.post("/predict", content=b"x")
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    body = shed.json()["error"]
    assert body["type"] == "overloaded" and "2 requests in flight" in body["message"]
    assert shed_s < 0.5
    assert after.status_code == 200  # recovers as soon as the load is gone


@run_async
async def test_a_late_event_loop_sheds_inference_until_it_catches_up() -> None:
    inner = _GatedApp()
    lag = LoopLagMonitor()  # not started: the test sets the measured lag itself
    app = _shedding(inner, lag=lag, max_lag_s=0.025)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        held = asyncio.create_task(client.post("/predict", content=b"x"))
        while inner.entered < 1:
            await asyncio.sleep(0.001)
        lag.lag_s = 0.040
        shed = await client.post("/predict", content=b"x")  # one in flight, the loop late
        health = await client.get("/health")
        lag.lag_s = 0.010
        inner.gate.set()
        served = await client.post("/predict", content=b"x")
        assert (await held).status_code == 200
    assert shed.status_code == 503
    assert "event loop 40 ms behind" in shed.json()["error"]["message"]
    assert health.status_code == 200 and served.status_code == 200


@run_async
async def test_a_late_loop_with_nothing_in_flight_still_admits_a_request() -> None:
    """Lateness with no request of ours in flight comes from elsewhere (another process on
    the CPU): refusing the one request relieves nothing. (Under the test suite's load, lone
    requests to in-process apps were refused this way.)"""
    inner = _GatedApp()
    inner.gate.set()
    lag = LoopLagMonitor()
    app = _shedding(inner, lag=lag, max_lag_s=0.025)
    lag.lag_s = 0.5
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        alone = await client.post("/predict", content=b"x")
    assert alone.status_code == 200


@run_async
async def test_lag_monitor_measures_a_blocked_loop() -> None:
    lag = LoopLagMonitor(interval_s=0.005)
    lag.start()
    try:
        await asyncio.sleep(0.02)
        time.sleep(0.08)  # one pause (a collection, say): not an overload
        await asyncio.sleep(0.03)
        assert lag.lag_s < 0.01
        end = time.perf_counter() + 0.3
        while time.perf_counter() < end:  # every loop iteration busy: a saturated CPU
            time.sleep(0.04)
            await asyncio.sleep(0)
        assert lag.lag_s >= 0.03
        await asyncio.sleep(0.3)
        assert lag.lag_s < 0.02  # decays once the loop keeps time again
    finally:
        await lag.stop()


def test_loop_lag_limit_follows_the_deadline_unless_set() -> None:
    assert ServeSettings(request_timeout_ms=250).loop_lag_limit_s == pytest.approx(0.025)
    assert ServeSettings().loop_lag_limit_s == pytest.approx(0.1)
    explicit = ServeSettings(request_timeout_ms=250, max_loop_lag_ms=40)
    assert explicit.loop_lag_limit_s == pytest.approx(0.04)
    with pytest.raises(ValueError, match="max_loop_lag_ms"):
        ServeSettings(max_loop_lag_ms=0)
    with pytest.raises(ValueError, match="loop"):
        ServeSettings(loop="tornado")  # type: ignore[arg-type]


def test_start_up_objects_are_frozen_out_of_the_collector(cnn_package: Path) -> None:
    gc.unfreeze()
    try:
        with ready_client(create_app(ServeSettings(package=str(cnn_package)))) as client:
            assert client.get("/ready").status_code == 200
            assert gc.get_freeze_count() > 10_000
    finally:
        gc.unfreeze()


def test_a_model_frozen_at_start_up_is_freed_when_retired(cnn_package: Path) -> None:
    from dlpipe.monitoring import MetricsCollector
    from dlpipe.serving.served import ServedModel

    settings = ServeSettings(package=str(cnn_package))

    async def serve_then_retire() -> tuple[weakref.ref[Any], weakref.ref[Any]]:
        served = ServedModel.load("fashion", "1", cnn_package, settings, MetricsCollector())
        served.batcher.start()
        await served.infer(np.zeros((1, 28, 28), np.float32))
        gc.collect()
        gc.freeze()  # what the server does once its start-up models are loaded
        refs = weakref.ref(served), weakref.ref(served.engine)
        await served.batcher.close()  # what the manager does when a version is retired
        return refs

    try:
        served, engine = asyncio.run(serve_then_retire())
        gc.collect()
        assert served() is None and engine() is None  # its ONNX Runtime session went with it
    finally:
        gc.unfreeze()


def test_every_request_leaves_the_arrivals_count(cnn_package: Path) -> None:
    png = random_png(np.random.default_rng(0))
    with ready_client(create_app(ServeSettings(package=str(cnn_package)))) as client:
        admission = client.app.state.admission  # type: ignore[attr-defined]
        arrivals = admission.arrivals
        for kwargs, status in [
            ({"files": {"file": ("a.png", png, "image/png")}}, 200),
            ({"files": {"file": ("a.png", b"junk", "image/png")}}, 400),
            ({"files": {"other": ("a.png", png, "image/png")}}, 400),
            ({"json": {"text": "an image model"}}, 400),
            ({"files": {"file": ("a.png", png, "image/png")}, "params": {"version": "9"}}, 404),
            ({"files": {"files": ("a.png", png, "image/png")}, "url": "/predict/batch"}, 200),
        ]:
            url = kwargs.pop("url", "/predict")
            assert client.post(url, **kwargs).status_code == status, kwargs  # type: ignore[arg-type]
            assert arrivals.count == 0 and admission.in_flight == 0, kwargs
        assert client.get("/health").status_code == 200 and arrivals.count == 0


def test_serve_uses_the_asyncio_loop_unless_told(clean_env: pytest.MonkeyPatch) -> None:
    from dlpipe.serving.cli import settings_from_args, uvicorn_config

    loops = []
    for env in ({}, {"DLPIPE_LOOP": "uvloop"}):
        with clean_env.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            settings = settings_from_args(["--package", "p"])
            loops.append(uvicorn_config(settings, app=None).loop)
    assert loops == ["asyncio", "uvloop"]


async def _tiny_server(delay_s: float, status: int) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                await reader.readexactly(length)
                await asyncio.sleep(delay_s)
                body = json.dumps({"model_version": "7"}).encode()
                writer.write(
                    f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("status", [200, 503])
@run_async
async def test_open_loop_counts_latency_from_the_scheduled_arrival(status: int) -> None:
    server = await _tiny_server(0.05, status)
    port = server.sockets[0].getsockname()[1]
    request = (
        f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 2\r\n\r\nhi"
    ).encode()
    try:
        summary, rows = await run_open_loop(f"http://127.0.0.1:{port}/p", [request], 40, 0.5)
    finally:
        server.close()
        await server.wait_closed()
    assert len(rows) == 20 and summary["offered_rps"] == 40
    assert all(end - sent >= 0.05 for sent, end, _, _ in rows)
    gaps = [b[0] - a[0] for a, b in zip(sorted(rows), sorted(rows)[1:], strict=False)]
    assert all(g == pytest.approx(1 / 40) for g in gaps)  # stamps are the schedule itself
    if status == 200:
        assert summary["ok"] == 20 and summary["p50_ms"] >= 50 and summary["versions"] == {"7": 20}
        assert summary["last_error_at_s"] is None and summary["max_ok_ms"] >= 50
    else:
        assert summary["statuses"] == {"503": 20} and summary["p95_503_ms"] >= 50
        assert summary["last_error_at_s"] == pytest.approx(19 / 40, abs=1e-3)
