"""Open Inference Protocol (KServe v2) routes, batch uploads, and the JSON access log."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_helpers import random_png, ready_client

from dlpipe.monitoring.logging import configure_logging
from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.engine import InferenceEngine
from dlpipe.serving.sources import LocalSource


@pytest.fixture(scope="module")
def client(cnn_package: Path) -> Iterator[TestClient]:
    cfg = ServeSettings(model_name="fashion", registry_refresh_s=3600, top_k=3)
    app = create_app(cfg, source=LocalSource.from_path("fashion", cnn_package))
    with ready_client(app) as c:
        yield c


def test_v2_infer_matches_the_engine(client: TestClient, cnn_package: Path) -> None:
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    tensor = {
        "name": "input",
        "shape": [3, 1, 28, 28],
        "datatype": "FP32",
        "data": x.ravel().tolist(),
    }
    for path in ("/v2/models/fashion/infer", "/v2/models/fashion/versions/1/infer"):
        r = client.post(path, json={"id": "req-7", "inputs": [tensor]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["id"] == "req-7" and body["model_version"] == "1"
        out = body["outputs"][0]
        assert out["name"] == "logits" and out["shape"] == [3, 10]
        expected = InferenceEngine(cnn_package, "cpu").predict_batch(x)
        np.testing.assert_allclose(
            np.array(out["data"]).reshape(3, 10), expected, rtol=1e-4, atol=1e-4
        )


def test_v2_metadata_health_and_errors(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").status_code == 200
    meta = client.get("/v2/models/fashion").json()
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert client.get("/v2/models/other").status_code == 404
    r = client.post("/v2/models/fashion/versions/5/infer", json={"inputs": []})
    assert r.status_code == 400  # the body is checked before the version
    bad = {"name": "input", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": [0.0]}
    r = client.post("/v2/models/fashion/infer", json={"inputs": [bad]})
    assert r.status_code == 400 and "needs 784 values, got 1" in r.json()["error"]


def test_batch_upload_keeps_order_and_top_k(client: TestClient) -> None:
    files = [
        ("files", (f"f{i}.png", random_png(np.random.default_rng(i)), "image/png"))
        for i in range(5)
    ]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["inputs"] == [f"f{i}.png" for i in range(5)]
    assert [len(p) for p in body["predictions"]] == [3] * 5
    single = client.post("/predict", files={"file": ("f3.png", files[3][1][1], "image/png")}).json()
    assert single["predictions"] == body["predictions"][3]


def test_one_json_log_line_per_request_with_its_request_id(client: TestClient) -> None:
    stream = io.StringIO()
    handler = configure_logging("INFO", stream=stream)
    try:
        r = client.get("/health", headers={"X-Request-ID": "trace-abc"})
    finally:
        logging.getLogger().removeHandler(handler)
    assert r.headers["x-request-id"] == "trace-abc"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    access = [e for e in lines if e.get("event") == "request"]
    assert len(access) == 1
    assert access[0]["request_id"] == "trace-abc"
    assert access[0]["status"] == 200 and access[0]["endpoint"] == "/health"
