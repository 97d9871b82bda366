"""A real Prometheus scrapes a real `dlpipe serve` under load; PromQL agrees with the client.

Starts `dlpipe serve --package` (a freshly exported simple_cnn ONNX package) and
`/usr/bin/prometheus` (the shipped scrape config with its bearer-token authorization, 1 s scrapes,
the alert rules from deploy/prometheus) on free local ports,
drives /predict with a closed-loop load generator, then asks Prometheus's HTTP API for the request
count, the request rate and the p95 latency and compares them with what the clients measured.
"""

from __future__ import annotations

import bisect
import http.client
import io
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml
from deploy_helpers import (
    PROMETHEUS,
    ROOT,
    query,
    scalar,
    shipped_prometheus_config,
    wait_for_value,
)
from deploy_helpers import (
    prometheus as run_prometheus,
)

from dlpipe.evaluation import ServerProcess
from dlpipe.monitoring.metrics import LATENCY_BUCKETS

ENDPOINT = "/predict"
CLIENTS = 4
LOAD_SECONDS = 7.0
WARMUP_REQUESTS = 20
# Keys are required, /metrics included: the clients send one, Prometheus scrapes with another.
CLIENT_KEY = "load-client-key"
METRICS_KEY = "prometheus-scrape-key"

pytestmark = [
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus server not installed (`make system-deps` installs Debian prometheus)",
    ),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def model_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real model package: simple_cnn exported to ONNX with a dynamic batch axis."""
    import torch

    from dlpipe.config import load_config
    from dlpipe.models import create_model, example_inputs
    from dlpipe.tracking.metadata import ModelMetadata
    from dlpipe.tracking.package import save_model_package

    root = tmp_path_factory.mktemp("package")
    cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml")
    net = create_model("simple_cnn", 10, 1).eval()
    inputs = example_inputs("simple_cnn", 2, cfg.preprocessing)
    onnx_path = root / "export.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        net,
        inputs,
        onnx_path,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,  # one self-contained file (the package renames it to model.onnx)
    )
    metadata = ModelMetadata(
        model_name="fashion_mnist_cnn",
        framework="onnx",
        precision="fp32",
        model_size_mb=0.0,
        training_date=datetime.now(UTC),
        accuracy_metrics={"test/acc": 0.1},
        preprocessing_config=cfg.preprocessing,
        version="1",
    )
    return save_model_package(root / "model", cfg, metadata, onnx_path=onnx_path)


@pytest.fixture(scope="module")
def dlpipe_server(model_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dlpipe serve --package` as a separate process; yields its base URL once /ready."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {
        "OMP_NUM_THREADS": "1",
        "DLPIPE_ACCESS_LOG": "false",
        "DLPIPE_LOG_LEVEL": "warning",
        "DLPIPE_ORT_INTRA_OP_THREADS": "1",
        "DLPIPE_REQUIRE_AUTH": "true",
        "DLPIPE_API_KEYS": f"{CLIENT_KEY},{METRICS_KEY}",
    }
    with ServerProcess(package=str(model_package), env=env, log_path=log) as server:
        yield f"127.0.0.1:{server.port}"


@pytest.fixture(scope="module")
def prometheus(dlpipe_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping the server every second with the shipped alert rules."""
    work = tmp_path_factory.mktemp("prometheus")
    token = work / "metrics_key"
    token.write_text(METRICS_KEY)
    config = shipped_prometheus_config(
        target=dlpipe_server,
        rule_file=ROOT / "deploy/prometheus/alerts.yml",
        credentials_file=token,
    )
    with run_prometheus(config, work) as url:
        yield url


def _png_upload() -> tuple[bytes, str]:
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(png, format="PNG")
    boundary = "dlpipe-load-boundary"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + png.getvalue()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class Completed:
    finished: float  # wall clock, as Prometheus timestamps
    latency_s: float
    status: int


def _post(conn: http.client.HTTPConnection, body: bytes, content_type: str) -> int:
    headers = {"Content-Type": content_type, "X-API-Key": CLIENT_KEY}
    conn.request("POST", ENDPOINT, body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    return response.status


def _closed_loop(server: str, seconds: float, clients: int) -> list[Completed]:
    """`clients` threads, each sending the next request as soon as the last one is answered."""
    body, content_type = _png_upload()
    host, port = server.split(":")
    done: list[Completed] = []
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        mine = []
        while time.time() < stop_at:
            start = time.perf_counter()
            status = _post(conn, body, content_type)
            mine.append(Completed(time.time(), time.perf_counter() - start, status))
        conn.close()
        with lock:
            done.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done


def _bucket_index(seconds: float) -> int:
    """Index of the latency histogram bucket that holds `seconds`."""
    return bisect.bisect_left(LATENCY_BUCKETS, seconds)


@pytest.mark.slow
def test_prometheus_reports_what_the_load_generator_measured(
    dlpipe_server: str, prometheus: str
) -> None:
    selector = f'dlpipe_requests_total{{job="dlpipe",endpoint="{ENDPOINT}",status="200"}}'
    wait_for_value(prometheus, 'up{job="dlpipe"}', 1.0)

    body, content_type = _png_upload()
    host, port = dlpipe_server.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    statuses = [_post(conn, body, content_type) for _ in range(WARMUP_REQUESTS)]
    conn.close()
    assert statuses == [200] * WARMUP_REQUESTS
    wait_for_value(prometheus, f"sum({selector})", WARMUP_REQUESTS)
    time.sleep(1.5)  # at least one more flat scrape before the load starts

    load_start = time.time()
    done = _closed_loop(dlpipe_server, LOAD_SECONDS, CLIENTS)
    load_end = max(c.finished for c in done)
    assert all(c.status == 200 for c in done), {c.status for c in done}

    # Count: after the next scrape Prometheus holds exactly what the server answered.
    wait_for_value(prometheus, f"sum({selector})", WARMUP_REQUESTS + len(done))
    evaluated_at = time.time()

    # Rate: a window strictly inside the load, compared with the clients' completions in it.
    window = int(LOAD_SECONDS - 2)
    rate_at = load_end - 0.5
    prom_rate = scalar(prometheus, f"sum(rate({selector}[{window}s]))", at=rate_at)
    client_rate = sum(rate_at - window < c.finished <= rate_at for c in done) / window
    assert prom_rate is not None
    assert prom_rate == pytest.approx(client_rate, rel=0.2), (prom_rate, client_rate)

    # p95: over the whole load (flat before and after); histogram_quantile is scale-invariant,
    # so range extrapolation does not move it.
    span = int(evaluated_at - load_start + 1.2) + 1
    prom_p95 = scalar(
        prometheus,
        "histogram_quantile(0.95, sum by (le) (increase(dlpipe_request_latency_seconds_bucket"
        f'{{job="dlpipe",endpoint="{ENDPOINT}",status="200"}}[{span}s])))',
        at=evaluated_at,
    )
    client_p95 = float(np.percentile([c.latency_s for c in done], 95))
    assert prom_p95 is not None
    assert abs(_bucket_index(prom_p95) - _bucket_index(client_p95)) <= 1, (
        f"PromQL p95 {prom_p95 * 1000:.2f} ms vs client p95 {client_p95 * 1000:.2f} ms "
        f"are more than one histogram bucket apart (buckets {LATENCY_BUCKETS})"
    )
    print(
        f"\n{len(done)} requests, {CLIENTS} clients, {LOAD_SECONDS:.0f} s | "
        f"rate PromQL {prom_rate:.1f}/s vs client {client_rate:.1f}/s | "
        f"p95 PromQL {prom_p95 * 1000:.2f} ms vs client {client_p95 * 1000:.2f} ms"
    )

    # The shipped alert rules are loaded and evaluate cleanly; the server is not reported down.
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=5) as response:
        groups = json.load(response)["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert len(rules) == sum(len(g["rules"]) for g in shipped["groups"]), rules
    assert all(r["health"] == "ok" for r in rules), rules
    assert query(prometheus, 'ALERTS{alertname="DlpipeDown"}') == []
