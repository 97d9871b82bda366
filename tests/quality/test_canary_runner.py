"""`CanaryRunner` and `dlpipe registry canary` on a real MLflow store and a real prediction log
(written with `PredictionLog` by a stand-in server that routes by the registry's split): every
step and decision in the audit trail, traffic back to the champion when interrupted, and the
command's exit statuses."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dlpipe.config import PipelineConfig
from dlpipe.quality.canary import CanaryPolicy
from dlpipe.quality.canary_runner import CanaryMetrics, CanaryRunner
from dlpipe.quality.predlog import PredictionLog
from dlpipe.routing import ABTestConfig, choose_version
from dlpipe.tracking.cli import main
from dlpipe.tracking.heartbeats import RolloutTimeout
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.package import save_model_package
from dlpipe.tracking.registry import ModelRegistry


@pytest.fixture
def registry(tmp_mlflow_uri: str, tmp_path: Path) -> ModelRegistry:
    cfg = PipelineConfig()
    meta = ModelMetadata(
        "m", "pytorch", "fp32", 0.01, datetime(2025, 3, 4, tzinfo=UTC), {"acc": 0.75},
        cfg.preprocessing,
    )  # fmt: skip
    pkg = save_model_package(tmp_path / "pkg", cfg, meta, net=torch.nn.Linear(3, 2))
    reg = ModelRegistry(tmp_mlflow_uri, cache_dir=tmp_path / "cache")
    for _ in range(2):
        reg.register_model(pkg, meta)
    reg.promote("m", "1")
    return reg


class StandIn:
    """Answers requests as servers would, routed by the registry's current split, and logs
    them: version 2 answers in `slow_ms`, version 1 in about 2 ms."""

    def __init__(self, registry: ModelRegistry, log_dir: Path, slow_ms: float = 2.0) -> None:
        self.registry = registry
        self.log = PredictionLog(log_dir)
        self.slow_ms = slow_ms
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        rng = np.random.default_rng(0)
        k = 0
        while not self.stop.is_set():
            state = self.registry.fetch_routing("m")
            for _ in range(100):
                version, _ = choose_version(state, "m", f"r{k}")
                median = self.slow_ms if version == "2" else 2.0
                self.log.submit(
                    {"type": "prediction", "ts": time.time(), "request_id": f"r{k}",
                     "model_version": version, "status": 200,
                     "latency_ms": median * float(rng.lognormal(0, 0.2))}
                )  # fmt: skip
                k += 1
            time.sleep(0.02)

    def __enter__(self) -> StandIn:
        self.log.start()
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()
        self.log.close()


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "predictions"


def test_an_equal_candidate_is_promoted_and_every_step_audited(
    registry: ModelRegistry, log_dir: Path
) -> None:
    metrics = CanaryMetrics()
    runner = CanaryRunner(
        registry, "m", "2", CanaryPolicy(min_samples=40), log_dir, poll_s=0.05, metrics=metrics
    )
    with StandIn(registry, log_dir):
        result = runner.run()
    assert result.outcome == "promote" and [d["share"] for d in result.decisions] == [5, 25, 50]
    state = registry.fetch_routing("m")
    assert state.champion == "2" and state.ab is None
    history = registry.history("m")
    assert [e["action"] for e in history][-9:] == [
        "canary_start", "ab_set", "canary_advance", "ab_set", "canary_advance", "ab_set",
        "canary_promote", "promote", "ab_clear",
    ]  # fmt: skip
    splits = [e["to"]["traffic_split"] for e in history if e["action"] == "ab_set"]
    assert splits == [0.95, 0.75, 0.5]
    advance = next(e for e in history if e["action"] == "canary_advance")
    assert advance["from"] == 5 and advance["to"] == 25
    latency = advance["detail"]["checks"]["latency"]
    assert latency["n"][0] == 40 and 0 < latency["p_value"] <= 1 and latency["verdict"] == "ok"
    assert advance["detail"]["counts"]["candidate_requests"] >= 40
    value = metrics.registry.get_sample_value
    assert value("dlpipe_canary_step_percent", {"model_name": "m", "candidate": "2"}) == 100
    assert value("dlpipe_canary_decisions_total", {"model_name": "m", "decision": "advance"}) == 2


def test_a_slow_candidate_is_rolled_back_on_latency(registry: ModelRegistry, log_dir: Path) -> None:
    runner = CanaryRunner(registry, "m", "2", CanaryPolicy(min_samples=40), log_dir, poll_s=0.05)
    with StandIn(registry, log_dir, slow_ms=6.0):
        result = runner.run()
    assert result.outcome == "rollback"
    assert result.decisions[-1]["reasons"] == ["latency significantly worse"]
    assert registry.fetch_routing("m").ab is None and registry.fetch_routing("m").champion == "1"
    assert [e["action"] for e in registry.history("m")][-2:] == ["canary_rollback", "rollback"]


def test_an_interrupted_canary_gives_all_traffic_back_to_the_champion(
    registry: ModelRegistry, log_dir: Path
) -> None:
    calls = []

    def wait() -> None:
        calls.append(registry.fetch_routing("m").ab)
        raise RolloutTimeout("server s1 still applies another plan", [], "d")

    runner = CanaryRunner(registry, "m", "2", CanaryPolicy(), log_dir, wait=wait)
    with pytest.raises(RolloutTimeout):
        runner.run()
    assert calls == [ABTestConfig("1", "2", 0.95)]  # the first step was set, then it failed
    state = registry.fetch_routing("m")
    assert state.ab is None and state.champion == "1"
    abort = registry.history("m")[-1]
    assert abort["action"] == "canary_abort" and "still applies" in abort["detail"]["reason"]


def test_command_exit_statuses(
    registry: ModelRegistry, log_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["canary", "m", "--candidate", "2", "--tracking-uri", registry.registry_uri]
    assert main(base) == 2  # no prediction log
    assert "--prediction-log" in capsys.readouterr().err
    assert main([*base, "--prediction-log", str(log_dir), "--steps", "5,50"]) == 2
    assert "end at 100" in capsys.readouterr().err
    registry.set_ab_config("m", ABTestConfig("1", "2", 0.5))
    assert main([*base, "--prediction-log", str(log_dir)]) == 1
    assert "has an A/B split already" in capsys.readouterr().err
    registry.clear_ab_config("m")
    with StandIn(registry, log_dir, slow_ms=6.0):
        code = main([*base, "--prediction-log", str(log_dir), "--min-samples", "40",
                     "--poll", "0.05", "--json"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1 and json.loads(out)["outcome"] == "rollback"
    assert "canary rollback at 5 % -> 0 %: latency significantly worse" in err
    assert err.strip().splitlines()[-1].startswith("dlpipe registry: error: version 2 rolled")
