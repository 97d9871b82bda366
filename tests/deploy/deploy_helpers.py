"""Helpers for the deploy tests that start real processes: Prometheus, Alertmanager, a webhook.

Every process listens on 127.0.0.1 on a free port, keeps its data in a temporary directory and
is stopped (SIGTERM, then SIGKILL) when its context exits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dlpipe.evaluation import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
# Debian's prometheus-alertmanager names the server binary after the package.
ALERTMANAGER = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
AMTOOL = shutil.which("amtool")


def wait_for_url(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    """Until `url` answers 200; fails with the log's tail if the process exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args!r} exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running(cmd: list[str], work: Path, ready_path: str, port: int) -> Iterator[str]:
    """Start `cmd` (logging to work/NAME.log), yield its base URL once `ready_path` is 200."""
    log = work / f"{Path(cmd[0]).name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_url(f"{url}{ready_path}", proc, log, timeout_s=60)
        yield url
    finally:
        stop(proc)


def shipped_prometheus_config(
    *,
    target: str,
    rule_file: Path,
    credentials_file: Path | None,
    alertmanager: str | None = None,
    interval: str = "1s",
) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml pointed at local processes, with fast scrapes.

    Only addresses, file paths and intervals change: the `dlpipe` job (its path and its
    authorization block) and the alerting section are the shipped ones.
    """
    cfg: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=interval, evaluation_interval=interval)
    cfg["rule_files"] = [str(rule_file)]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "dlpipe"]
    job["scrape_timeout"] = interval
    job["static_configs"][0]["targets"] = [target]
    if credentials_file is None:
        del job["authorization"]
    else:
        assert job["authorization"]["type"] == "Bearer"
        job["authorization"]["credentials_file"] = str(credentials_file)
    cfg["scrape_configs"] = [job]
    if alertmanager is None:
        del cfg["alerting"]
    else:
        (am,) = cfg["alerting"]["alertmanagers"]
        am["static_configs"] = [{"targets": [alertmanager]}]
    return cfg


@contextmanager
def prometheus(config: dict[str, Any], work: Path) -> Iterator[str]:
    """A real Prometheus server with `config`; yields its base URL once /-/ready."""
    assert PROMETHEUS is not None
    path = work / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [
        PROMETHEUS,
        f"--config.file={path}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with running(cmd, work, "/-/ready", port) as url:
        yield url


@contextmanager
def alertmanager(config: dict[str, Any], work: Path) -> Iterator[str]:
    """A real Alertmanager with `config` (no cluster gossip); yields its base URL once ready."""
    assert ALERTMANAGER is not None
    path = work / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [
        ALERTMANAGER,
        f"--config.file={path}",
        f"--storage.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    with running(cmd, work, "/-/ready", port) as url:
        yield url


def query(prom: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant PromQL query through Prometheus' HTTP API."""
    params = {"query": expr} | ({"time": f"{at:.3f}"} if at is not None else {})
    url = f"{prom}/api/v1/query?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def scalar(prom: str, expr: str, at: float | None = None) -> float | None:
    result = query(prom, expr, at)
    return float(result[0]["value"][1]) if result else None


def wait_for_value(prom: str, expr: str, expected: float, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    value = None
    while time.monotonic() < deadline:
        value = scalar(prom, expr)
        if value == expected:
            return
        time.sleep(0.25)
    raise AssertionError(f"Prometheus: {expr} = {value}, expected {expected}")


def failing_package(root: Path) -> Path:
    """A model package whose graph fails at run time for bright images, and only for them.

    logits = table[mean(x) > 0] with a one-row table: warm-up (zeros) and dark images read row 0;
    a bright image asks for row 1 and ONNX Runtime's Gather raises, as a broken model would.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from dlpipe.config import load_config
    from dlpipe.tracking.metadata import ModelMetadata
    from dlpipe.tracking.package import save_model_package

    cfg = load_config(ROOT / "configs" / "fashion_mnist.yaml")
    n = len(cfg.preprocessing.class_names or []) or 10
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["input", "axes"], ["mean"], keepdims=0),
            helper.make_node("Greater", ["mean", "zero"], ["bright"]),
            helper.make_node("Cast", ["bright"], ["row"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "row"], ["logits"], axis=0),
        ],
        "fails_on_bright_images",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n])],
        [
            numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "axes"),
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
            numpy_helper.from_array(np.linspace(0, 1, n, dtype=np.float32)[None, :], "table"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(root / "failing.onnx"))
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
    return save_model_package(root / "model", cfg, metadata, onnx_path=root / "failing.onnx")


class WebhookReceiver:
    """A tiny HTTP server collecting the JSON bodies POSTed to it (Alertmanager's webhooks)."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self._changed = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._changed:
                    receiver.posts.append((self.path, json.loads(body)))
                    receiver._changed.notify_all()
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:  # quiet: the test reports what matters
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def alerts(self) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        """(path, notification, alert) for every alert in every notification so far."""
        with self._changed:
            return [(path, n, a) for path, n in self.posts for a in n.get("alerts", [])]

    def wait_for(
        self, alertname: str, status: str, timeout_s: float
    ) -> tuple[str, dict[str, Any], dict[str, Any]]:
        """The first (path, notification, alert) for `alertname` in state `status`."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for path, note, alert in self.alerts():
                    if alert["labels"].get("alertname") == alertname and alert["status"] == status:
                        return path, note, alert
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"no {status} {alertname} notification in {timeout_s} s; got {self.posts}"
                    )
                self._changed.wait(left)
