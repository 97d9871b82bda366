"""Server heartbeats in a real MLflow store, and `--wait` on them: it returns once every live
server reports the registry's routing, ignores expired heartbeats, and otherwise times out
naming the servers behind (exit 1, the change itself made)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from dlpipe.config import PipelineConfig
from dlpipe.evaluation import free_port
from dlpipe.routing import ABTestConfig, Heartbeat, RoutingState, laggards, routing_digest
from dlpipe.tracking.cli import main
from dlpipe.tracking.heartbeats import (
    RolloutTimeout,
    delete_heartbeat,
    heartbeat_key,
    prune_heartbeats,
    wait_until_applied,
    write_heartbeat,
)
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.package import save_model_package
from dlpipe.tracking.registry import ModelRegistry

NAME = "beats"


@pytest.fixture(scope="module")
def registry(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    cfg = PipelineConfig()
    meta = ModelMetadata(
        NAME, "pytorch", "fp32", 0.01, datetime(2025, 3, 4, tzinfo=UTC), {"acc": 0.75},
        cfg.preprocessing,
    )  # fmt: skip
    pkg = save_model_package(tmp_path_factory.mktemp("pkg"), cfg, meta, net=torch.nn.Linear(3, 2))
    reg = ModelRegistry(module_mlflow_uri, cache_dir=tmp_path_factory.mktemp("cache"))
    for _ in range(3):
        reg.register_model(pkg, meta)
    reg.promote(NAME, "1")
    return reg


@pytest.fixture(autouse=True)
def no_heartbeats(registry: ModelRegistry) -> None:
    prune_heartbeats(registry.client, NAME, older_than_s=-1.0)  # every test starts with none


def _beat(registry: ModelRegistry, server: str, digest: str | None, age_s: float = 0.0) -> None:
    beat = Heartbeat(server, 1, digest, None, time=time.time() - age_s, interval_s=1.0)
    write_heartbeat(registry.client, NAME, beat)


def test_digest_follows_what_routes_and_nothing_else() -> None:
    ab = ABTestConfig("1", "2", 0.9)
    assert routing_digest(RoutingState(champion="1")) == routing_digest(
        RoutingState(champion="1", aliases={"champion": "1", "staging": "3"})
    )
    assert routing_digest(RoutingState(champion="1")) == routing_digest(RoutingState(latest="1"))
    assert routing_digest(RoutingState(champion="1", ab=ab)) == routing_digest(
        RoutingState(champion="3", ab=ab)  # the split decides, not the champion
    )
    digests = {
        routing_digest(s)
        for s in (
            RoutingState(champion="1"),
            RoutingState(champion="2"),
            RoutingState(champion="1", ab=ab),
            RoutingState(champion="1", ab=ABTestConfig("1", "2", 0.5)),
        )
    }
    assert len(digests) == 4


def test_liveness_and_laggards() -> None:
    now = 1000.0
    beats = [
        Heartbeat("a", 3, "new", time=now - 1.0, interval_s=1.0),
        Heartbeat("b", 2, "old", time=now - 2.9, interval_s=1.0),  # live: within 3 intervals
        Heartbeat("c", 9, "old", time=now - 3.1, interval_s=1.0),  # expired: a dead server
    ]
    assert [h.server_id for h in laggards(beats, "new", now)] == ["b"]
    assert Heartbeat.from_json(beats[0].to_json()) == beats[0]


def test_heartbeats_are_tags_read_back_and_pruned(registry: ModelRegistry) -> None:
    entries = len(registry.history(NAME))
    _beat(registry, "host/1 a", "d1")  # a name MLflow would refuse as a key is made safe
    _beat(registry, "host-2", "d2", age_s=7200)
    tags = registry.client.get_registered_model(NAME).tags
    assert heartbeat_key("host/1 a") in tags and tags[heartbeat_key("host/1 a")].startswith("{")
    assert [h.server_id for h in registry.server_heartbeats(NAME)] == ["host-2", "host/1 a"]
    assert prune_heartbeats(registry.client, NAME) == 1
    assert [h.server_id for h in registry.server_heartbeats(NAME)] == ["host/1 a"]
    assert len(registry.history(NAME)) == entries  # heartbeats are no audit entries


def test_wait_returns_when_every_live_server_applies_the_change(registry: ModelRegistry) -> None:
    registry.promote(NAME, "2")
    digest = routing_digest(registry.fetch_routing(NAME))
    _beat(registry, "dead", "stale", age_s=60)  # expired: not waited for
    _beat(registry, "s1", digest)
    _beat(registry, "s2", "stale")

    def catch_up() -> None:
        time.sleep(0.5)
        _beat(registry, "s2", digest)

    started = time.monotonic()
    thread = threading.Thread(target=catch_up)
    thread.start()
    applied = wait_until_applied(registry, NAME, timeout_s=10)
    thread.join()
    assert applied.servers == ["s1", "s2"] and applied.digest == digest
    assert 0.4 < time.monotonic() - started < 5


def test_wait_with_no_live_server_returns_at_once(registry: ModelRegistry) -> None:
    _beat(registry, "gone", "stale", age_s=100)
    assert wait_until_applied(registry, NAME, timeout_s=5).servers == []


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_cli_wait_times_out_naming_the_laggards(
    registry: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.promote(NAME, "1")
    _beat(registry, "ok-server", routing_digest(RoutingState(champion="3")))
    _beat(registry, "stuck-server", routing_digest(RoutingState(champion="1")))
    code, result, err = run(capsys, "promote", NAME, "3", "--wait", "--wait-timeout", "1", "--json")
    assert code == 1
    assert result["version"] == "3" and result["wait"]["laggards"] == ["stuck-server"]
    line = err.strip().splitlines()[-1]  # under --json, what the command printed goes first
    assert line.startswith("dlpipe registry: error: routing of 'beats'")
    assert "stuck-server (generation 1" in line and "ok-server" not in line
    assert registry.fetch_routing(NAME).champion == "3"  # the change stays made


def test_cli_wait_on_ab_and_rollback(
    registry: ModelRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    registry.promote(NAME, "1")
    split = ABTestConfig("1", "2", 0.75)
    _beat(registry, "s1", routing_digest(RoutingState(ab=split)))
    code, result, _ = run(
        capsys, "ab", NAME, "--a", "1", "--b", "2", "--split", "0.75", "--wait", "--json"
    )
    assert code == 0 and result["wait"]["applied"] and result["wait"]["servers"] == ["s1"]
    code, result, err = run(
        capsys, "rollback", NAME, "--to", "1", "--wait", "--wait-timeout", "0.5", "--json"
    )
    assert code == 1 and "s1" in err  # still reports the split
    _beat(registry, "s1", routing_digest(RoutingState(champion="1")))
    code, result, _ = run(capsys, "rollback", NAME, "--to", "1", "--wait", "--json")
    assert code == 0 and result["wait"]["servers"] == ["s1"]


def test_wait_timeout_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["promote", NAME, "1", "--wait", "--wait-timeout", "0"])
    assert code == 2 and "--wait-timeout" in capsys.readouterr().err


def test_timeout_error_carries_the_laggards(registry: ModelRegistry) -> None:
    _beat(registry, "behind", "stale")
    with pytest.raises(RolloutTimeout) as caught:
        wait_until_applied(registry, NAME, timeout_s=0.2)
    assert [h.server_id for h in caught.value.laggards] == ["behind"]
    assert caught.value.digest == routing_digest(registry.fetch_routing(NAME))


@pytest.mark.slow
def test_heartbeats_work_through_a_remote_mlflow_server(tmp_path: Path) -> None:
    """The same tags through MLflow's REST API (an `http://` store: no shared file, no signal)."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'remote.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{uri}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "mlflow server did not start"
                time.sleep(0.3)
        remote = ModelRegistry(uri, cache_dir=tmp_path / "cache")
        remote.client.create_registered_model(NAME)
        digest = routing_digest(remote.fetch_routing(NAME))
        write_heartbeat(remote.client, NAME, Heartbeat("far-away", 2, "old", interval_s=5))
        with pytest.raises(RolloutTimeout, match="far-away"):
            wait_until_applied(remote, NAME, timeout_s=0.5)
        write_heartbeat(remote.client, NAME, Heartbeat("far-away", 3, digest, interval_s=5))
        assert wait_until_applied(remote, NAME, timeout_s=5).servers == ["far-away"]
        delete_heartbeat(remote.client, NAME, "far-away")
        assert remote.server_heartbeats(NAME) == []
    finally:
        proc.terminate()
        proc.wait(30)
