"""A real `dlpipe serve` process through its life: HTTPS, start-up, faults, SIGTERM.

Each test starts the server as a user would (`dlpipe serve ...` in its own process) and talks to
it over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_helpers import random_png

from dlpipe.evaluation import ServerProcess, free_port
from tls_helpers import self_signed_certificate


def test_https_serves_a_verifying_client_and_refuses_plain_http(
    cnn_package: Path, tmp_path: Path
) -> None:
    cert, key = self_signed_certificate(tmp_path)
    args = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key)]
    with ServerProcess(package=str(cnn_package), args=args, verify=str(cert)) as server:
        assert server.url.startswith("https://")
        png = random_png(np.random.default_rng(0))
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert))) as client:
            r = client.post(f"{server.url}/predict", files={"file": ("x.png", png, "image/png")})
        assert r.status_code == 200 and r.json()["predictions"]
        with pytest.raises(httpx.HTTPError):  # a client that does not trust it gets nothing
            httpx.get(f"{server.url}/health", timeout=5)
        plain = f"http://127.0.0.1:{server.port}/health"
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is refused
            httpx.get(plain, timeout=5)


async def _hammer(url: str, png: bytes, clients: int, stop: asyncio.Event) -> list[Any]:
    """Closed-loop clients until `stop`; each outcome is a status code or an exception name."""
    outcomes: list[Any] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:

        async def one() -> None:
            while not stop.is_set():
                try:
                    r = await client.post(url, files={"file": ("x.png", png, "image/png")})
                    outcomes.append(r.status_code)
                except httpx.HTTPError as err:
                    outcomes.append(type(err).__name__)
                    await asyncio.sleep(0.05)

        await asyncio.gather(*(one() for _ in range(clients)))
    return outcomes


def test_sigterm_drains_accepted_requests_then_exits_in_time(
    cnn_package: Path, tmp_path: Path
) -> None:
    drain_s, grace_s = 1.0, 10.0
    args = ["--drain-s", str(drain_s), "--shutdown-grace-s", str(grace_s)]
    server = ServerProcess(package=str(cnn_package), args=args, log_path=tmp_path / "server.log")
    png = random_png(np.random.default_rng(3))

    async def scenario() -> tuple[list[Any], list[int], float]:
        stop = asyncio.Event()
        load = asyncio.create_task(_hammer(f"{server.url}/predict", png, 32, stop))
        await asyncio.sleep(2.0)
        os.kill(server.pid, signal.SIGTERM)
        signalled = time.perf_counter()
        ready: list[int] = []
        async with httpx.AsyncClient(timeout=2) as probe:
            while time.perf_counter() - signalled < drain_s * 0.8:
                ready.append((await probe.get(f"{server.url}/ready")).status_code)
                await asyncio.sleep(0.1)
        code = await asyncio.to_thread(server.wait, drain_s + grace_s + 10)
        exited = time.perf_counter() - signalled
        stop.set()
        outcomes = await load
        assert code in (0, -signal.SIGTERM), server.log_tail()
        return outcomes, ready, exited

    with server:
        outcomes, ready, exited = asyncio.run(scenario())
    counts = Counter(outcomes)
    answered = {k: v for k, v in counts.items() if isinstance(k, int)}
    print(f"SIGTERM under 32 clients: {dict(counts)}; exited {exited:.2f} s after the signal")
    assert answered.get(200, 0) > 100
    assert set(answered) == {200}, counts  # every request the server accepted was answered
    assert ready and set(ready) == {503}  # readiness flipped at once, serving went on
    assert exited < drain_s + grace_s


def _register_two(uri: str, package: Path, root: Path) -> None:
    from dlpipe.tracking.metadata import ModelMetadata
    from dlpipe.tracking.registry import ModelRegistry

    registry = ModelRegistry(uri, cache_dir=root / "cache")
    for _ in range(2):
        meta = ModelMetadata.from_json((package / "metadata.json").read_text())
        meta.version = ""
        registry.register_model(package, meta)
    registry.promote("fashion", "1")


@pytest.mark.slow
def test_registry_outage_during_load_fails_no_request(
    cnn_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real MLflow server stopped (and restarted) under load: the last plan keeps serving."""
    monkeypatch.chdir(tmp_path)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", store, "--artifacts-destination", str(tmp_path / "artifacts"),
        "--workers", "1",
    ]  # fmt: skip

    def start_mlflow() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{uri}/health", timeout=1).status_code == 200:
                    return proc
            except httpx.HTTPError:
                time.sleep(0.3)
        proc.kill()
        raise TimeoutError("mlflow server did not start")

    mlflow_server = start_mlflow()
    try:
        _register_two(uri, cnn_package, tmp_path)
        env = {"DLPIPE_REGISTRY_REFRESH_S": "0.2", "DLPIPE_MODEL_CACHE": str(tmp_path / "srv")}
        with ServerProcess(model_name="fashion", tracking_uri=uri, env=env) as server:
            png = random_png(np.random.default_rng(4))

            async def scenario() -> list[Any]:
                stop = asyncio.Event()
                load = asyncio.create_task(_hammer(f"{server.url}/predict", png, 16, stop))
                await asyncio.sleep(1.5)
                mlflow_server.terminate()  # the registry goes away mid-load
                await asyncio.to_thread(mlflow_server.wait, 30)
                async with httpx.AsyncClient() as c:
                    deadline = time.monotonic() + 30  # MLflow's client retries before failing
                    while "registry" not in (ready := (await c.get(f"{server.url}/ready")).json()):
                        assert time.monotonic() < deadline, ready
                        await asyncio.sleep(0.2)
                assert ready["ready"] is True and "unreachable" in ready["registry"], ready
                await asyncio.sleep(2.0)  # more load with no registry at all
                stop.set()
                return await load

            outcomes = asyncio.run(scenario())
            counts = Counter(outcomes)
            print(f"registry stopped under load: {dict(counts)}")
            assert set(counts) == {200} and counts[200] > 100, counts
            mlflow_server = start_mlflow()  # back: the server notices and says so
            deadline = time.monotonic() + 30
            while "registry" in httpx.get(f"{server.url}/ready").json():
                assert time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        mlflow_server.terminate()
        mlflow_server.wait(30)


def test_health_answers_while_the_registry_is_unreachable_at_start(tmp_path: Path) -> None:
    """Start-up never waits on the registry: liveness at once, readiness says why not."""
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    port = free_port()
    cmd = [sys.executable, "-m", "dlpipe.cli", "serve", "--model", "fashion", "--port", str(port)]
    env = {**os.environ, "DLPIPE_TRACKING_URI": dead, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = time.monotonic()
        health = None
        while time.monotonic() - started < 60 and health is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
            except httpx.HTTPError:
                time.sleep(0.1)
        assert health is not None and health.status_code == 200
        deadline = time.monotonic() + 30
        while True:
            ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=5)
            if "reason" in ready.json() and "registry" in ready.json()["reason"]:
                break
            assert time.monotonic() < deadline, ready.json()
            time.sleep(0.2)
        assert ready.status_code == 503 and dead not in ready.text  # no hosts in the body
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
