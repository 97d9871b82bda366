"""Quality against real `dlpipe serve` processes: drift on real Fashion-MNIST traffic, the log
across a restart under load, and feedback joined across the workers of `--workers 2`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import png_bytes

from dlpipe.evaluation import ServerProcess
from dlpipe.quality import read_records
from dlpipe.quality.drift import DRIFT_THRESHOLD
from dlpipe.quality.predlog import log_files

WINDOW = 1000  # the default quality_window, the one docs/monitoring.md states figures for
STEP = 50


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def _drift(url: str, served: int) -> dict[str, float]:
    """Drift scores covering every input sent so far: the log's writer takes them within 50 ms,
    the gauges are refreshed every second."""
    time.sleep(1.3)
    m = _metrics(url)
    assert m[("dlpipe_drift_window", (("model_version", "1"),))] == min(served, WINDOW)
    return {
        dict(labels)["statistic"]: v
        for (name, labels), v in m.items()
        if name == "dlpipe_drift_score"
    }


def _send(url: str, images: np.ndarray) -> None:
    files = [("files", (f"{i}.png", png_bytes(x), "image/png")) for i, x in enumerate(images)]
    r = httpx.post(url + "/predict/batch", files=files, timeout=60)
    assert r.status_code == 200, r.text


def test_drift_alerts_on_inverted_images_not_on_the_test_set(
    profiled_package: Path, fashion: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """The profile: 2000 training images. Test images served as they are stay below 0.1 on every
    statistic; the same images inverted (255 - x) push mean_intensity past the threshold within
    a tenth of the window (the bound docs/monitoring.md gives; 80 inputs here)."""
    env = {"DLPIPE_ACCESS_LOG": "false", "DLPIPE_MAX_BATCH_ITEMS": str(STEP)}
    test = fashion["test"]
    with ServerProcess(package=str(profiled_package), env=env, log_path=tmp_path / "s.log") as s:
        for start in range(0, WINDOW, STEP):
            _send(s.url, test[start : start + STEP])
        calm = _drift(s.url, WINDOW)
        print("test set as traffic, PSI:", calm)
        assert set(calm) == {"mean_intensity", "contrast", "pixels", "predicted_class"}
        assert max(calm.values()) < 0.1, calm
        crossed_after = None
        inverted = 255 - test[WINDOW : 2 * WINDOW]
        for start in range(0, WINDOW, STEP // 5):
            _send(s.url, inverted[start : start + STEP // 5])
            scores = _drift(s.url, WINDOW + start + STEP // 5)
            if scores["mean_intensity"] > DRIFT_THRESHOLD:
                crossed_after = start + STEP // 5
                break
        print(f"inverted: PSI {scores} after {crossed_after} inverted inputs (window {WINDOW})")
    assert crossed_after is not None and crossed_after <= WINDOW // 10


async def _load(
    url: str, prefix: str, seconds: float, clients: int, results: dict[str, int]
) -> None:
    """Closed-loop clients, each request with its own id; status 0 when the connection failed."""
    image = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    stop = time.monotonic() + seconds

    async def client(c: int) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            n = 0
            while time.monotonic() < stop:
                rid = f"{prefix}-{c}-{n}"
                n += 1
                try:
                    r = await http.post(
                        url + "/predict",
                        files={"file": ("x.png", image, "image/png")},
                        headers={"X-Request-ID": rid},
                    )
                    results[rid] = r.status_code
                except httpx.HTTPError:
                    results[rid] = 0
                    await asyncio.sleep(0.05)

    await asyncio.gather(*(client(c) for c in range(clients)))


def test_log_loses_nothing_across_a_restart_under_load(
    profiled_package: Path, tmp_path: Path
) -> None:
    """SIGTERM while 8 clients keep sending, a new server on the same log, more load: the log
    holds exactly the sampled ids of the 200 answers (sampling 0.5, by request-id hash), and
    feedback for a prediction made before the restart still joins."""
    log_dir = tmp_path / "log"
    env = {
        "DLPIPE_ACCESS_LOG": "false",
        "DLPIPE_PREDICTION_LOG_DIR": str(log_dir),
        "DLPIPE_PREDICTION_LOG_SAMPLE": "0.5",
    }
    results: dict[str, int] = {}
    first = ServerProcess(package=str(profiled_package), env=env, log_path=tmp_path / "1.log")
    with first:

        async def load_then_stop() -> None:
            load = asyncio.ensure_future(_load(first.url, "a", 6.0, 8, results))
            await asyncio.sleep(3.0)
            os.kill(first.pid, signal.SIGTERM)  # mid-load: accepted requests finish
            await load

        asyncio.run(load_then_stop())
        assert first.wait(60) in (0, -15)  # uvicorn re-raises SIGTERM after its graceful stop
    answered = [rid for rid, status in results.items() if status == 200]
    refused = sum(status != 200 for status in results.values())
    second = ServerProcess(package=str(profiled_package), env=env, log_path=tmp_path / "2.log")
    with second:
        asyncio.run(_load(second.url, "b", 3.0, 8, results))
        sampled_before = [rid for rid in answered if zlib.crc32(rid.encode()) < 2**31]
        r = httpx.post(
            second.url + "/feedback",
            json=[{"request_id": rid, "label": 0} for rid in sampled_before[:20]],
        )
        assert {x["outcome"] for x in r.json()["results"]} <= {"correct", "incorrect"}, r.text
    ok = {rid for rid, status in results.items() if status == 200}
    expected = {rid for rid in ok if zlib.crc32(rid.encode()) < 2**31}
    records = read_records(log_dir)
    logged = [r["request_id"] for r in records if r["type"] == "prediction"]
    print(
        f"{len(ok)} answered 200 ({len(answered)} before the restart, {refused} refused or cut "
        f"while stopping), {len(expected)} sampled, {len(logged)} logged"
    )
    assert len(answered) > 100 and len(ok) > len(answered) + 100
    assert len(logged) == len(set(logged))  # no line twice
    assert set(logged) == expected


def test_feedback_joins_across_workers(profiled_package: Path, tmp_path: Path) -> None:
    """Two server processes share the log: a label is joined whichever worker made the
    prediction and whichever receives the label, and both report the same accuracy."""
    env = {
        "DLPIPE_ACCESS_LOG": "false",
        "DLPIPE_PREDICTION_LOG_DIR": str(tmp_path / "log"),
        "DLPIPE_WORKERS": "2",
    }
    image = png_bytes(np.zeros((28, 28), dtype=np.uint8))
    with ServerProcess(package=str(profiled_package), env=env, log_path=tmp_path / "s.log") as s:
        predicted: dict[str, str] = {}
        for _ in range(40):  # new connections: the kernel spreads them over both workers
            r = httpx.post(s.url + "/predict", files={"file": ("x.png", image, "image/png")})
            predicted[r.json()["request_id"]] = r.json()["predictions"][0]["label"]
        labels = [
            {
                "request_id": rid,
                "label": label if i % 4 else "class_9" if label != "class_9" else "class_0",
            }
            for i, (rid, label) in enumerate(predicted.items())
        ]
        outcomes = []
        for item in labels:
            r = httpx.post(s.url + "/feedback", json=item)
            outcomes.append(r.json()["results"][0]["outcome"])
        assert outcomes.count("unknown") == 0, outcomes
        assert outcomes.count("incorrect") == 10 and outcomes.count("correct") == 30
        time.sleep(0.5)  # the feedback lines reach the files
        writer: dict[tuple[str, str], str] = {}  # (type, request id) -> the file's process
        for path in log_files(tmp_path / "log"):
            for record in read_records_of(path):
                writer[(record["type"], record["request_id"])] = path.name.split("-")[2]
        made = {writer[("prediction", rid)] for rid in predicted}
        crossed = [
            rid for rid in predicted if writer[("feedback", rid)] != writer[("prediction", rid)]
        ]
        assert len(made) == 2 and crossed, "both workers predict, and labels cross workers"
        time.sleep(2.5)  # both workers refresh their gauges from the shared log
        values = set()
        for _ in range(10):  # each worker writes its own value; the latest is shown
            m = _metrics(s.url)
            values.add(m[("dlpipe_online_accuracy", (("model_version", "1"),))])
            time.sleep(0.3)
        assert values == {0.75}


def read_records_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]
