"""End-to-end evaluation over HTTP: start the real server, send a held-out split, measure.

with ServerProcess(model_name="fashion_mnist_cnn", tracking_uri=uri) as server:
    result = evaluate_over_http(server.url, raw_test_samples(cfg), cfg, clients=16)
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx
import numpy as np

from dlpipe.config import PipelineConfig


@dataclass
class HttpEvalResult:
    requests: int
    errors: int
    accuracy: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_rps: float
    versions: dict[str, int]
    """How many responses each model version gave."""
    retries: int = 0
    """503 answers that were retried after their Retry-After (the server shedding load)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`dlpipe serve` in a child process on 127.0.0.1; waits for /ready, stops on exit."""

    def __init__(
        self,
        model_name: str | None = None,
        tracking_uri: str | None = None,
        package: str | None = None,
        port: int = 0,
        env: dict[str, str] | None = None,
        ready_timeout_s: float = 120.0,
        log_path: str | Path | None = None,
        args: list[str] | None = None,
        verify: str | bool = True,
    ):
        """Args:
        args: more `dlpipe serve` flags; with `--ssl-certfile` the server speaks HTTPS and
            `verify` (a CA file) is what the readiness check trusts.
        """
        self.port = port or free_port()
        extra = list(args or [])
        scheme = "https" if "--ssl-certfile" in extra else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.verify = verify
        cmd = [sys.executable, "-m", "dlpipe.cli", "serve", "--port", str(self.port), *extra]
        if model_name:
            cmd += ["--model", model_name]
        if package:
            cmd += ["--package", package]
        if tracking_uri:
            cmd += ["--tracking-uri", tracking_uri]
        self._cmd = cmd
        self._env = {**os.environ, **(env or {})}
        self._ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        """The server's exit status once stopped (-15: it exited on SIGTERM's default)."""
        # The server logs one JSON line per request: a file, never an unread pipe that fills up.
        self.log_path = Path(log_path) if log_path else None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int:
        """The server's process id (while it runs)."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        return self._proc.pid

    def wait(self, timeout_s: float) -> int:
        """Wait for the server to exit by itself; its exit status."""
        if self._proc is None:
            raise RuntimeError("the server is not running")
        return self._proc.wait(timeout=timeout_s)

    def log_tail(self, chars: int = 2000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def __enter__(self) -> ServerProcess:
        self._log = open(self.log_path, "w+b") if self.log_path else tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            self._cmd, env=self._env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self._ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"server exited with {self._proc.returncode}: {self.log_tail()}")
            try:
                ready = httpx.get(f"{self.url}/ready", timeout=1.0, verify=self.verify)
                if ready.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise TimeoutError(f"server not ready within {self._ready_timeout_s:.0f} s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self.returncode = self._proc.returncode
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def encode_png(image: np.ndarray) -> bytes:
    """uint8 H×W or H×W×C array → PNG bytes (what a user would upload)."""
    from PIL import Image

    array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def raw_test_samples(cfg: PipelineConfig, limit: int | None = None) -> list[tuple[Any, int]]:
    """The held-out test split as (raw sample, label): PNG bytes for images, str for text."""
    from dlpipe.data import build_datamodule

    dm = build_datamodule(cfg)
    samples = dm.raw_samples("test", limit)
    if cfg.preprocessing.task_type == "image_classification":
        return [(encode_png(x), y) for x, y in samples]
    return list(samples)


MAX_RETRIES = 5
"""503 answers retried per sample (after the server's Retry-After, at most 1 s each)."""


def _retry_after_s(resp: httpx.Response) -> float:
    try:
        return min(1.0, max(0.0, float(resp.headers.get("retry-after", "0.1"))))
    except ValueError:
        return 0.1


async def _drive(
    url: str, samples: list[tuple[Any, int]], is_text: bool, clients: int, headers: dict[str, str]
) -> tuple[list[float], list[bool], list[str], int, int]:
    latencies: list[float] = []
    correct: list[bool] = []
    versions: list[str] = []
    errors = retries = 0
    queue = iter(samples)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=30.0, limits=limits) as client:

        async def send(payload: Any) -> httpx.Response:
            if is_text:
                return await client.post("/predict", json={"text": payload}, headers=headers)
            files = {"file": ("x.png", payload, "image/png")}
            return await client.post("/predict", files=files, headers=headers)

        async def worker() -> None:
            nonlocal errors, retries
            for payload, label in queue:
                start = time.perf_counter()
                try:
                    resp = await send(payload)
                    for _ in range(MAX_RETRIES):
                        if resp.status_code != 503:
                            break
                        retries += 1  # shed under load: honour Retry-After, as clients should
                        await asyncio.sleep(_retry_after_s(resp))
                        resp = await send(payload)
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if resp.status_code != 200:
                    errors += 1
                    continue
                body = resp.json()
                correct.append(body["predictions"][0]["class_index"] == label)
                versions.append(str(body["model_version"]))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, correct, versions, errors, retries


def evaluate_over_http(
    url: str,
    samples: list[tuple[Any, int]],
    cfg: PipelineConfig,
    clients: int = 16,
    headers: dict[str, str] | None = None,
) -> HttpEvalResult:
    """Send every sample to `POST /predict` from `clients` concurrent connections (closed loop)."""
    if not samples:
        raise ValueError("no samples to evaluate")
    is_text = cfg.preprocessing.task_type == "text_classification"
    start = time.perf_counter()
    latencies, correct, versions, errors, retries = asyncio.run(
        _drive(url, samples, is_text, clients, headers or {})
    )
    elapsed = time.perf_counter() - start
    lat_ms = np.asarray(latencies) * 1000.0 if latencies else np.zeros(1)
    counts: dict[str, int] = {}
    for v in versions:
        counts[v] = counts.get(v, 0) + 1
    return HttpEvalResult(
        requests=len(samples),
        errors=errors,
        accuracy=float(np.mean(correct)) if correct else 0.0,
        p50_ms=float(np.percentile(lat_ms, 50)),
        p95_ms=float(np.percentile(lat_ms, 95)),
        p99_ms=float(np.percentile(lat_ms, 99)),
        throughput_rps=len(samples) / elapsed,
        versions=counts,
        retries=retries,
    )
