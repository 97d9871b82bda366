"""Routing changes known to have landed: two real `dlpipe serve` processes on one MLflow store
report their applied plan in heartbeats; `dlpipe registry rollback --wait` (the real CLI, in its
own process) returns only once both apply it, so no request sent after it returned is answered
by the rolled-back version (design Property 26 at the HTTP level, under load)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_helpers import make_biased_package, random_png

from dlpipe.evaluation import ServerProcess
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.registry import ModelRegistry
from loadgen import multipart_request, run_load

WINNER = {"1": 3, "2": 5}
CLIENTS_PER_SERVER = 8  # 16 in all, as the measurement in the issue


def _cli(uri: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", "registry", *argv, "--tracking-uri", uri, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.fixture(scope="module")
def two_servers(
    module_mlflow_uri: str, serving_root: Path, base_onnx: Path
) -> Iterator[tuple[list[ServerProcess], ModelRegistry]]:
    registry = ModelRegistry(module_mlflow_uri, cache_dir=serving_root / "wait-cache-test")
    for version, winner in WINNER.items():
        pkg = make_biased_package(serving_root / "wait", base_onnx, version, winner)
        meta = ModelMetadata.from_json((pkg / "metadata.json").read_text())
        meta.version = ""
        assert registry.register_model(pkg, meta) == version
    registry.promote("fashion", "1")
    servers = [
        ServerProcess(
            model_name="fashion",
            env={
                "OMP_NUM_THREADS": "1",
                "DLPIPE_TRACKING_URI": module_mlflow_uri,
                "DLPIPE_REGISTRY_REFRESH_S": "2.0",  # the default: servers follow within 2 s
                "DLPIPE_MODEL_CACHE": str(serving_root / f"wait-cache-server-{i}"),
                "DLPIPE_REQUEST_TIMEOUT_MS": "5000",
                "DLPIPE_ACCESS_LOG": "false",
            },
            log_path=serving_root / f"wait-server-{i}.log",
        )
        for i in range(2)
    ]
    with servers[0], servers[1]:
        yield servers, registry


def _live_ids(registry: ModelRegistry) -> set[str]:
    return {h.server_id for h in registry.server_heartbeats("fashion") if h.live()}


def test_servers_report_their_plan_in_models_and_heartbeats(
    two_servers: tuple[list[ServerProcess], ModelRegistry],
) -> None:
    servers, registry = two_servers
    deadline = time.monotonic() + 20
    while len(_live_ids(registry)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    described = [httpx.get(s.url + "/models").json() for s in servers]
    ids = {d["heartbeat"]["server_id"] for d in described}
    assert len(ids) == 2 and ids == _live_ids(registry)
    beats = {h.server_id: h for h in registry.server_heartbeats("fashion")}
    for d in described:
        beat = beats[d["heartbeat"]["server_id"]]
        assert beat.digest == d["plan_digest"] and beat.generation == d["generation"]
        assert beat.plan is not None and beat.plan["serving_versions"] == ["1"]


def test_promote_wait_returns_once_both_servers_apply_it(
    two_servers: tuple[list[ServerProcess], ModelRegistry], module_mlflow_uri: str
) -> None:
    servers, registry = two_servers
    done = _cli(module_mlflow_uri, "promote", "fashion", "2", "--wait")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["version"] == "2" and result["wait"]["applied"] is True
    assert sorted(result["wait"]["servers"]) == sorted(_live_ids(registry))
    # Already applied when the command returned: no polling needed here.
    for server in servers:
        assert httpx.get(server.url + "/models").json()["routing"]["serving_versions"] == ["2"]
    r = httpx.post(
        servers[0].url + "/predict",
        files={"file": ("x.png", random_png(np.random.default_rng(0)), "image/png")},
    )
    assert r.json()["predictions"][0]["class_index"] == WINNER["2"]


def test_after_rollback_wait_returns_no_response_comes_from_the_rolled_back_version(
    two_servers: tuple[list[ServerProcess], ModelRegistry], module_mlflow_uri: str
) -> None:
    servers, registry = two_servers
    if registry.fetch_routing("fashion").champion != "2":
        assert _cli(module_mlflow_uri, "promote", "fashion", "2", "--wait").returncode == 0
    marks: dict[str, float] = {}

    def requests_for(server: ServerProcess) -> list[bytes]:
        return [
            multipart_request(
                "127.0.0.1", server.port, "/predict", "file", "x.png",
                random_png(np.random.default_rng(i)), "image/png",
            )
            for i in range(8)
        ]  # fmt: skip

    async def rollback() -> None:
        await asyncio.sleep(2.0)
        marks["started"] = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dlpipe.cli", "registry", "rollback", "fashion", "--to", "1",
            "--wait", "--wait-timeout", "30", "--tracking-uri", module_mlflow_uri, "--json",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        marks["returned"] = time.perf_counter()
        assert proc.returncode == 0, err.decode()
        result = json.loads(out)
        marks["waited_s"] = result["wait"]["waited_s"]
        assert result["wait"]["applied"] and len(result["wait"]["servers"]) == 2, result
        # The command knew before its process ended: count from that moment (the stricter).
        marks["confirmed"] = result["wait"]["confirmed_at"] - (time.time() - time.perf_counter())

    async def load(server: ServerProcess) -> list[tuple[float, float, int, str]]:
        # One-second rounds until 3 s after the command returned: the command alone may take
        # seconds to start on a busy machine, and the load must outlast it.
        rows: list[tuple[float, float, int, str]] = []
        while "returned" not in marks or time.perf_counter() < marks["returned"] + 3.0:
            _, got = await run_load(
                server.url + "/predict", requests_for(server), CLIENTS_PER_SERVER, 1.0, 0.0
            )
            rows.extend(got)
        return rows

    async def main() -> list[tuple[float, float, int, str]]:
        loads = [asyncio.create_task(load(s)) for s in servers]
        await rollback()
        return [row for task in loads for row in await task]

    rows = asyncio.run(main())
    since = min(marks["confirmed"], marks["returned"])
    assert [r for r in rows if r[2] != 200] == []
    during = [v for sent, _, _, v in rows if marks["started"] <= sent < since]
    after = [v for sent, _, _, v in rows if sent >= since]
    print(
        json.dumps(
            {
                "requests": len(rows),
                "command_s": round(marks["returned"] - marks["started"], 3),
                "waited_s": marks["waited_s"],
                "answered_by_2_while_waiting": during.count("2"),
                "sent_after_return": len(after),
                "answered_by_2_after_return": after.count("2"),
            }
        )
    )
    assert "2" in during  # the rolled-back version was serving when the rollback started
    assert len(after) > 100 and set(after) == {"1"}
