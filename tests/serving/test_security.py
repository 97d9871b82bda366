"""API keys, per-key rate limits, upload size limits."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_helpers import random_png, ready_client, upload

from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.sources import LocalSource

# Latency or timing is part of what is asserted: run alone, after the parallel part of the suite.
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def secured(cnn_package: Path) -> Iterator[TestClient]:
    cfg = ServeSettings(
        model_name="fashion",
        api_keys=["alpha-key", "beta-key"],
        rate_limit="5/second",
        max_upload_bytes=4096,
        registry_refresh_s=3600,
        access_log=False,
    )
    app = create_app(cfg, source=LocalSource.from_path("fashion", cnn_package))
    with ready_client(app) as client:
        yield client


def _png() -> dict:  # type: ignore[type-arg]
    return upload(random_png(np.random.default_rng(0)))


def test_keys_are_required_and_checked(secured: TestClient) -> None:
    r = secured.post("/predict", files=_png())
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]
    r = secured.post("/predict", files=_png(), headers={"X-API-Key": "alpha-kex"})
    assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
    r = secured.post("/predict", files=_png(), headers={"Authorization": "Basic abc"})
    assert r.status_code == 401
    assert secured.post("/predict", files=_png(), headers={"X-API-Key": "beta-key"}).is_success
    ok = secured.post("/predict", files=_png(), headers={"Authorization": "Bearer alpha-key"})
    assert ok.is_success
    # Probes stay open for orchestrators; everything else (metrics too) needs a key.
    assert secured.get("/health").is_success
    assert secured.get("/metrics").status_code == 401
    assert secured.get("/metrics", headers={"X-API-Key": "alpha-key"}).is_success


def test_rate_limit_is_per_key_with_retry_after(secured: TestClient) -> None:
    codes = [
        secured.post("/predict", files=_png(), headers={"X-API-Key": "alpha-key"}).status_code
        for _ in range(8)
    ]
    assert codes.count(429) >= 2 and codes[0] == 200
    limited = secured.post("/predict", files=_png(), headers={"X-API-Key": "alpha-key"})
    assert limited.status_code == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["type"] == "rate_limited"
    # Another key has its own budget.
    other = secured.post("/predict", files=_png(), headers={"X-API-Key": "beta-key"})
    assert other.status_code == 200


def test_oversize_upload_is_413_declared_or_streamed(secured: TestClient) -> None:
    big = upload(b"\x89PNG" + b"\x00" * 10_000)
    r = secured.post("/predict", files=big, headers={"X-API-Key": "beta-key"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b"\x00" * 1000

    r = secured.post(
        "/predict",
        content=chunks(),
        headers={"X-API-Key": "beta-key", "content-type": "image/png"},
    )
    assert r.status_code == 413
    assert secured.get("/health").is_success


def test_saturated_event_loop_sheds_new_requests_promptly(secured: TestClient) -> None:
    app = secured.app
    monitor = app.state.lag_monitor  # type: ignore[attr-defined]
    assert secured.portal is not None
    secured.portal.call(monitor.stop)  # freeze the reading the test sets
    monitor.lag_s = 5.0  # the loop runs 5 s late: the CPU is the queue
    in_flight = app.state.admission.admit()  # type: ignore[attr-defined]  # one request inside
    try:
        r = secured.post("/predict", files=_png(), headers={"X-API-Key": "beta-key"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert r.json()["error"]["type"] == "overloaded"
        assert "event loop" in r.json()["error"]["message"]
        assert secured.get("/health").status_code == 200  # probes are never shed
    finally:
        in_flight.release()
        monitor.lag_s = 0.0
        secured.portal.call(monitor.start)
    ok = secured.post("/predict", files=_png(), headers={"X-API-Key": "beta-key"})
    assert ok.status_code in (200, 429)
