"""Design properties 14-19 against the real app (in-process, lifespan running)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import FakeGpuReader, png_bytes, random_png, ready_client, sample_value, upload

from dlpipe.monitoring.gpu import GpuReading
from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.sources import LocalSource

# Latency or timing is part of what is asserted: run alone, after the parallel part of the suite.
pytestmark = pytest.mark.serial

PROPERTY = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
pixels = st.integers(0, 255).map(lambda v: np.full((28, 28), v, np.uint8)) | st.builds(
    lambda seed: np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8),
    st.integers(0, 2**32 - 1),
)


@pytest.fixture(scope="module")
def gpu_reader() -> FakeGpuReader:
    return FakeGpuReader()


@pytest.fixture(scope="module")
def client(cnn_package: Path, gpu_reader: FakeGpuReader) -> Iterator[TestClient]:
    cfg = ServeSettings(
        model_name="fashion",
        max_batch_size=16,
        max_wait_ms=2.0,
        request_timeout_ms=10_000,
        registry_refresh_s=3600,
        max_upload_bytes=64 * 1024,
        api_keys=["secret-key"],
        gpu_poll_interval_s=3600,
        access_log=False,
    )
    source = LocalSource.from_path("fashion", cnn_package)
    app = create_app(cfg, source=source, gpu_reader=gpu_reader)
    with ready_client(app, headers={"X-API-Key": "secret-key"}) as c:
        yield c


def _app(client: TestClient) -> FastAPI:
    app: FastAPI = client.app  # type: ignore[assignment]
    return app


def _batcher(client: TestClient) -> Any:
    state = _app(client).state.manager.state
    return state.models["1"].batcher


# Feature: deep-learning-pipeline, Property 14: Batch inference utilization
@PROPERTY
@given(images=st.lists(pixels, min_size=1, max_size=16))
def test_concurrent_requests_within_window_run_as_one_batch(
    client: TestClient, images: list[np.ndarray]
) -> None:
    app = _app(client)
    n = len(images)
    batcher = _batcher(client)
    # A wide window (1 s) that closes as soon as all n requests have arrived.
    batcher.max_batch_size, batcher.max_wait_s = n, 1.0
    labels = {"model_version": "1"}
    count0 = sample_value(app, "dlpipe_batch_size_count", labels)
    sum0 = sample_value(app, "dlpipe_batch_size_sum", labels)
    runs0 = batcher.batches_run

    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        headers = {"X-API-Key": "secret-key"}
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as ac:
            return await asyncio.gather(
                *(
                    ac.post("/predict", files=upload(png_bytes(img)), headers=headers)
                    for img in images
                )
            )

    assert client.portal is not None
    try:
        responses = client.portal.call(burst)
    finally:
        batcher.max_batch_size, batcher.max_wait_s = 16, 0.002
    assert [r.status_code for r in responses] == [200] * n
    assert batcher.batches_run - runs0 == 1  # the engine ran once for all n requests
    assert sample_value(app, "dlpipe_batch_size_count", labels) - count0 == 1
    assert sample_value(app, "dlpipe_batch_size_sum", labels) - sum0 == n


def _png_idat_end(data: bytes) -> int:
    end = data.index(b"IEND") - 4  # the IEND chunk's length field
    return end


invalid_requests = st.one_of(
    st.binary(min_size=0, max_size=300).map(lambda b: ("junk bytes", upload(b"\x00" + b), None)),
    st.just(("empty file", upload(b""), None)),
    st.tuples(st.integers(0, 2**32 - 1), st.floats(0.0, 0.9)).map(
        lambda t: (
            "truncated png",
            upload(
                (png := random_png(np.random.default_rng(t[0])))[: int(t[1] * _png_idat_end(png))]
            ),
            None,
        )
    ),
    st.text(min_size=1, max_size=10)
    .filter(lambda f: f != "file")
    .map(
        lambda f: (
            "wrong field",
            {f: ("x.png", random_png(np.random.default_rng(0)), "image/png")},
            None,
        )
    ),
    st.binary(min_size=1, max_size=50).map(lambda b: ("bad json", None, b"{" + b)),
    st.just(("text to an image model", None, b'{"text": "hello"}')),
    st.tuples(st.integers(1, 4), st.integers(1, 40), st.integers(1, 40))
    .filter(lambda s: (s[1], s[2]) != (28, 28) or s[0] != 1)
    .map(lambda s: ("wrong tensor shape", "v2", s)),
)


# Feature: deep-learning-pipeline, Property 15: Invalid input error handling
@PROPERTY
@given(case=invalid_requests)
def test_invalid_input_gets_400_with_details_and_server_survives(
    client: TestClient, case: tuple[str, Any, Any]
) -> None:
    what, files, body = case
    if files == "v2":
        c, h, w = body
        tensor = {
            "name": "input",
            "shape": [1, c, h, w],
            "datatype": "FP32",
            "data": [0.0] * (c * h * w),
        }
        r = client.post("/v2/models/fashion/infer", json={"inputs": [tensor]})
    elif files is not None:
        r = client.post("/predict", files=files)
    else:
        r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, (what, r.text)
    error = r.json()["error"]
    if files == "v2":  # the Open Inference Protocol's shape: {"error": "<message>"}
        assert isinstance(error, str) and len(error) > 10, what
        assert r.headers["x-request-id"]
    else:
        assert error["type"] == "invalid_input"
        assert len(error["message"]) > 10, what
        assert error["request_id"] == r.headers["x-request-id"]
    assert client.get("/health").status_code == 200
    ok = client.post("/predict", files=upload(random_png(np.random.default_rng(1))))
    assert ok.status_code == 200


# Feature: deep-learning-pipeline, Property 16: Latency metrics recording
@PROPERTY
@given(kinds=st.lists(st.sampled_from(["ok", "bad", "missing_version"]), min_size=1, max_size=8))
def test_every_request_is_counted_in_the_latency_histogram(
    client: TestClient, kinds: list[str]
) -> None:
    app = _app(client)
    expected = {"ok": ("1", "200"), "bad": ("", "400"), "missing_version": ("", "404")}
    before = {
        k: sample_value(
            app,
            "dlpipe_request_latency_seconds_count",
            {"endpoint": "/predict", "model_version": v, "status": s},
        )
        for k, (v, s) in expected.items()
    }
    for kind in kinds:
        data = random_png(np.random.default_rng(2)) if kind != "bad" else b"nope"
        params = {"version": "42"} if kind == "missing_version" else {}
        r = client.post("/predict", files=upload(data), params=params)
        assert r.status_code == int(expected[kind][1])
    for kind, (version, status) in expected.items():
        labels = {"endpoint": "/predict", "model_version": version, "status": status}
        after = sample_value(app, "dlpipe_request_latency_seconds_count", labels)
        assert after - before[kind] == kinds.count(kind), kind


gpu_readings = st.lists(
    st.tuples(st.floats(0, 100), st.integers(1, 200 * 2**30), st.floats(0, 1)),
    min_size=1,
    max_size=4,
)


# Feature: deep-learning-pipeline, Property 17: GPU metrics tracking
@PROPERTY
@given(readings=gpu_readings)
def test_gpu_utilization_and_memory_are_exposed(
    client: TestClient, gpu_reader: FakeGpuReader, readings: list[tuple[float, int, float]]
) -> None:
    gpu_reader.readings = [
        GpuReading(str(i), util, int(total * share), total)
        for i, (util, total, share) in enumerate(readings)
    ]
    _app(client).state.gpu_monitor.poll_once()  # what the monitor thread does every interval
    text = client.get("/metrics").text
    values = {
        (s.name, s.labels.get("gpu")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("dlpipe_gpu_")
    }
    for r in gpu_reader.readings:
        assert values[("dlpipe_gpu_utilization_percent", r.gpu)] == pytest.approx(
            r.utilization_percent
        )
        assert values[("dlpipe_gpu_memory_used_bytes", r.gpu)] == r.memory_used_bytes
        assert values[("dlpipe_gpu_memory_total_bytes", r.gpu)] == r.memory_total_bytes


def _predict_total(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "dlpipe_requests_total" and s.labels["endpoint"] == "/predict"
    )


# Feature: deep-learning-pipeline, Property 18: Throughput metrics availability
@PROPERTY
@given(n=st.integers(0, 12))
def test_throughput_follows_from_counters_over_a_window(client: TestClient, n: int) -> None:
    import time

    t0, snap0 = time.monotonic(), client.get("/metrics?format=json").json()
    before = _predict_total(client.get("/metrics").text)
    for i in range(n):
        assert client.post(
            "/predict", files=upload(random_png(np.random.default_rng(i)))
        ).is_success
    after = _predict_total(client.get("/metrics").text)
    t1, snap1 = time.monotonic(), client.get("/metrics?format=json").json()
    window = t1 - t0
    assert after - before == n
    assert (after - before) / window == pytest.approx(n / window)
    # The JSON snapshot counts the same requests (plus the two scrapes and the first snapshot).
    assert snap1["requests_total"] - snap0["requests_total"] == n + 3
    assert snap1["throughput_rps"] > 0


error_cases = {
    "invalid_input": lambda c: c.post("/predict", files=upload(b"not an image")),
    "version_not_found": lambda c: c.post(
        "/predict", files=upload(random_png(np.random.default_rng(0))), params={"version": "77"}
    ),
    "unauthorized": lambda c: c.post(
        "/predict", files=upload(b"x"), headers={"X-API-Key": "wrong"}
    ),
    "payload_too_large": lambda c: c.post("/predict", files=upload(b"\x89PNG" * 20_000)),
    "not_found": lambda c: c.get("/no/such/route"),
    "unsupported_media_type": lambda c: c.post(
        "/predict", content=b"hello", headers={"content-type": "text/plain"}
    ),
}


# Feature: deep-learning-pipeline, Property 19: Error metrics recording
@PROPERTY
@given(error_type=st.sampled_from(sorted(error_cases)))
def test_each_error_increments_its_counter_and_is_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture, error_type: str
) -> None:
    app = _app(client)
    before = {t: sample_value(app, "dlpipe_errors_total", {"error_type": t}) for t in error_cases}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dlpipe.monitoring"):
        r = error_cases[error_type](client)
    assert r.status_code >= 400
    assert r.json()["error"]["type"] == error_type
    for t in error_cases:
        delta = sample_value(app, "dlpipe_errors_total", {"error_type": t}) - before[t]
        assert delta == (1 if t == error_type else 0), t
    logged = [rec for rec in caplog.records if getattr(rec, "error_type", None) == error_type]
    assert len(logged) == 1
    assert getattr(logged[0], "detail", "")


def test_scrape_reports_live_throughput_and_in_flight(cnn_package: Path) -> None:
    """`dlpipe_throughput_rps` and the JSON snapshot's `in_flight` follow real traffic."""
    settings_ = ServeSettings(package=str(cnn_package), access_log=False, gpu_poll_interval_s=3600)
    app = create_app(settings_)
    with ready_client(app) as c:
        assert sample_value(app, "dlpipe_throughput_rps") == 0.0
        for _ in range(20):
            assert c.post("/predict", files=upload(random_png(np.random.default_rng(1)))).is_success
        rps = sample_value(app, "dlpipe_throughput_rps")
        snapshot = c.get("/metrics", params={"format": "json"}).json()
        assert snapshot["in_flight"] == 1  # the scrape itself is in flight while it is taken
        assert rps > 0 and rps == pytest.approx(snapshot["throughput_rps"], rel=0.5)


def test_an_expired_request_is_counted_once_where_it_is_answered(cnn_package: Path) -> None:
    """A request that expires in the queue gets its 504 (and its one `timeout` count) from the
    error handler; the batcher's own statistics must not count it a second time."""
    from dlpipe.serving.batcher import BatchStats

    app = create_app(ServeSettings(package=str(cnn_package), access_log=False))
    with ready_client(app):
        served, _ = app.state.manager.route()
        assert served.batcher.on_batch is not None
        served.batcher.on_batch(BatchStats(1, (0.001,), 0.001, expired=2))
        assert sample_value(app, "dlpipe_errors_total", {"error_type": "timeout"}) == 0


def test_a_failed_model_load_is_logged_with_its_traceback(
    tmp_path: Path, cnn_package: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cnn_package, broken)
    (broken / "model.onnx").write_bytes(b"not a graph")
    app = create_app(ServeSettings(package=str(broken), access_log=False))
    with caplog.at_level(logging.ERROR, logger="dlpipe.serving"), TestClient(app) as c:
        deadline = time.monotonic() + 30
        while not app.state.manager.failures and time.monotonic() < deadline:
            time.sleep(0.02)
        ready = c.get("/ready")
        assert ready.status_code == 503 and "failed to load" in ready.json()["reason"]
        assert "not a graph" not in ready.text and str(broken) not in ready.text
    failed = [r for r in caplog.records if "failed" in r.getMessage() and r.exc_info]
    assert failed, [r.getMessage() for r in caplog.records]
    assert "ModelLoadError" in caplog.text


def test_answered_requests_leave_no_reference_cycles(client: TestClient) -> None:
    """A request's objects (its uploads, samples, closures) are freed by reference counting when
    it ends. One cycle per request once left them all to the collector, which then ran every
    few requests (docs/benchmarks.md, issue 10: 30 us of event-loop time per request)."""
    import gc

    image = png_bytes(np.zeros((28, 28), np.uint8))
    tensor = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0] * 784}
    client.post("/predict", files=upload(image)).raise_for_status()  # warm: caches, lazy imports
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            client.post("/predict", files=upload(image)).raise_for_status()
            client.post("/predict/batch", files=[("files", ("a.png", image, "image/png"))] * 2)
            client.post("/v2/models/fashion/infer", json={"inputs": [tensor]}).raise_for_status()
        gc.collect()
        ours = [
            o
            for o in gc.garbage
            if (getattr(o, "__module__", None) or type(o).__module__ or "").startswith("dlpipe")
        ]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert not ours, sorted({getattr(o, "__qualname__", type(o).__qualname__) for o in ours})
