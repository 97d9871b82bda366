"""`dlpipe serve` as a real process on the MLflow registry: predict, Prometheus text, and
promotion + rollback while requests are in flight (zero failures, no stale version after)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import make_biased_package, random_png

from dlpipe.evaluation import ServerProcess
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.registry import ModelRegistry
from loadgen import multipart_request, run_load

WINNER = {"1": 3, "2": 5}


@pytest.fixture(scope="module")
def registry_server(
    module_mlflow_uri: str, serving_root: Path, base_onnx: Path
) -> Iterator[tuple[ServerProcess, ModelRegistry]]:
    registry = ModelRegistry(module_mlflow_uri, cache_dir=serving_root / "registry-cache-test")
    for version, winner in WINNER.items():
        pkg = make_biased_package(serving_root / "registry", base_onnx, version, winner)
        meta = ModelMetadata.from_json((pkg / "metadata.json").read_text())
        meta.version = ""
        assert registry.register_model(pkg, meta) == version
    registry.promote("fashion", "1")
    server = ServerProcess(
        model_name="fashion",
        env={
            "OMP_NUM_THREADS": "1",
            "DLPIPE_TRACKING_URI": module_mlflow_uri,
            "DLPIPE_REGISTRY_REFRESH_S": "0.2",
            "DLPIPE_MODEL_CACHE": str(serving_root / "registry-cache-server"),
            "DLPIPE_REQUEST_TIMEOUT_MS": "5000",
        },
        log_path=serving_root / "registry-server.log",
    )
    with server:
        yield server, registry
    assert server.returncode in (0, -15)


def test_predict_headers_and_prometheus_text(
    registry_server: tuple[ServerProcess, ModelRegistry],
) -> None:
    server, _ = registry_server
    png = random_png(np.random.default_rng(0))
    r = httpx.post(
        server.url + "/predict",
        files={"file": ("x.png", png, "image/png")},
        headers={"X-Request-ID": "client-id-1"},
    )
    assert r.status_code == 200
    body = r.json()
    assert body["model_version"] == "1" and body["request_id"] == "client-id-1"
    assert r.headers["x-request-id"] == "client-id-1"
    assert body["predictions"][0] == {"label": "class_3", "class_index": 3, "probability": 1.0}
    families = {
        f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
    }
    for name in (
        "dlpipe_request_latency_seconds",
        "dlpipe_batch_size",
        "dlpipe_queue_wait_seconds",
        "dlpipe_inference_seconds",
        "dlpipe_in_flight_requests",
        "dlpipe_model_info",
        "dlpipe_routed_requests",
        "dlpipe_up",
    ):
        assert name in families, name
    info = [s.labels for s in families["dlpipe_model_info"].samples]
    assert {
        "model_name": "fashion",
        "model_version": "1",
        "framework": "onnx",
        "precision": "fp32",
    } in info
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/v2/models/{name}/infer" in httpx.get(server.url + "/openapi.json").json()["paths"]


def _wait_champion(url: str, version: str, timeout_s: float = 15.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        routing = httpx.get(url + "/models").json()["routing"]
        if routing and routing["serving_versions"] == [version]:
            return time.perf_counter()
        time.sleep(0.02)
    raise TimeoutError(f"server did not switch to version {version}")


def test_promotion_and_rollback_under_load(
    registry_server: tuple[ServerProcess, ModelRegistry],
) -> None:
    server, registry = registry_server
    requests = [
        multipart_request(
            "127.0.0.1",
            server.port,
            "/predict",
            "file",
            "x.png",
            random_png(np.random.default_rng(i)),
            "image/png",
        )
        for i in range(8)
    ]
    marks: dict[str, float] = {}

    async def operate() -> None:
        await asyncio.sleep(1.0)
        await asyncio.to_thread(registry.promote, "fashion", "2")
        marks["promoted"] = await asyncio.to_thread(_wait_champion, server.url, "2")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(registry.rollback, "fashion", "1")
        marks["rollback_returned"] = time.perf_counter()
        marks["rolled_back"] = await asyncio.to_thread(_wait_champion, server.url, "1")

    async def main() -> tuple[dict[str, Any], list[tuple[float, float, int, str]]]:
        load = asyncio.create_task(run_load(server.url + "/predict", requests, 4, 4.5, 0.0))
        await operate()
        return await load

    summary, rows = asyncio.run(main())
    assert summary["errors"] == 0, json.dumps(summary)
    assert set(summary["versions"]) == {"1", "2"}, summary
    assert marks["rolled_back"] - marks["rollback_returned"] < 5.0
    after_promotion = [
        v for sent, _, _, v in rows if marks["promoted"] < sent < marks["rollback_returned"]
    ]
    after_rollback = [v for sent, _, _, v in rows if sent > marks["rolled_back"]]
    assert after_promotion and set(after_promotion) == {"2"}
    assert len(after_rollback) > 10 and set(after_rollback) == {"1"}
