"""`dlpipe serve --workers N`: several processes on one port, exact metrics for the whole server,
readiness for all of them, a dead worker restarted, SIGTERM stopping them all."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import random_png

from dlpipe.evaluation import ServerProcess


def _children(pid: int) -> set[int]:
    """Live worker processes of `pid` (from /proc), not multiprocessing's resource tracker."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def _predict_count(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "dlpipe_requests_total" and sample.labels["endpoint"] == "/predict"
    )


def test_two_workers_share_the_port_and_count_exactly(cnn_package: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    env = {"OMP_NUM_THREADS": "1"}
    with ServerProcess(
        package=str(cnn_package), args=["--workers", "2"], env=env, log_path=log
    ) as server:
        workers = _children(server.pid)
        assert len(workers) == 2, workers
        png = random_png(np.random.default_rng(0))

        def client_session(_: int) -> int:
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for _ in range(10):
                    r = client.post("/predict", files={"file": ("x.png", png, "image/png")})
                    assert r.status_code == 200
            return 10

        def answered_by() -> set[int]:
            lines = [json.loads(x) for x in log.read_text().splitlines() if x.startswith("{")]
            return {
                e["pid"] for e in lines if e.get("event") == "request" and e["path"] == "/predict"
            }

        # Concurrent connections, so one worker is busy while the other accepts: which worker
        # accepts a connection is the kernel's race, so rounds go on until both have answered.
        sent = 0
        with ThreadPoolExecutor(8) as pool:
            for _ in range(10):
                sent += sum(pool.map(client_session, range(8)))
                if answered_by() == workers:
                    break
        assert _predict_count(server.url) == sent  # the sum over both workers, exactly
        assert answered_by() == workers, answered_by()

        # A worker that dies is restarted; meanwhile the server is not ready.
        dead = sorted(workers)[0]
        os.kill(dead, signal.SIGKILL)
        deadline = time.monotonic() + 60
        saw_unready = False
        while True:
            status = httpx.get(server.url + "/ready", timeout=5).status_code
            saw_unready |= status == 503
            alive = _children(server.pid)
            if status == 200 and len(alive) == 2 and dead not in alive:
                break
            assert time.monotonic() < deadline, "worker not restarted"
            time.sleep(0.1)
        assert saw_unready
        assert httpx.post(
            server.url + "/predict", files={"file": ("x.png", png, "image/png")}
        ).is_success
        os.kill(server.pid, signal.SIGTERM)
        started = time.monotonic()
        assert server.wait(40) in (0, -signal.SIGTERM)
        assert time.monotonic() - started < 30
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers - {dead})


def test_worker_settings_divide_the_cpu() -> None:
    from dlpipe.serving.settings import ServeSettings
    from dlpipe.serving.workers import worker_settings

    shared = worker_settings(ServeSettings(package="p"), workers=2)
    cores = os.cpu_count() or 1
    assert shared.ort_intra_op_threads == max(1, cores // 2)
    fixed = worker_settings(ServeSettings(package="p", ort_intra_op_threads=3), workers=2)
    assert fixed.ort_intra_op_threads == 3  # an explicit setting wins
