"""ModelRegistry on a real MLflow sqlite store: downloads, aliases, A/B, rollback, audit, caching,
and two-process races (concurrent registration; rollback while another process reads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from dlpipe.config import PipelineConfig
from dlpipe.routing import ABTestConfig, RoutingSignal, signal_path_for
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.package import save_model_package
from dlpipe.tracking.registry import ModelRegistry, RegistryError


@pytest.fixture(scope="module")
def store(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    return module_mlflow_uri


@pytest.fixture(scope="module")
def registry(store: str, tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(store, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = PipelineConfig()
    return save_model_package(
        tmp_path_factory.mktemp("pkg"), cfg, _meta("pkg"), net=torch.nn.Linear(4, 2)
    )


def _meta(name: str, **extra: Any) -> ModelMetadata:
    return ModelMetadata(
        model_name=name,
        framework="pytorch",
        precision="fp32",
        model_size_mb=0.001,
        training_date=datetime(2025, 1, 2, tzinfo=UTC),
        accuracy_metrics={"val/acc": 0.9},
        preprocessing_config=PipelineConfig().preprocessing,
        **extra,
    )


def _register(registry: ModelRegistry, package: Path, name: str, n: int) -> list[str]:
    return [registry.register_model(package, _meta(name)) for _ in range(n)]


def _snapshot(registry: ModelRegistry, name: str) -> tuple[Any, ...]:
    rows = registry.list_versions(name)
    return (
        [(r["version"], r["aliases"]) for r in rows],
        registry.get_ab_config(name),
        len(registry.history(name)),
    )


def test_routing_signal_is_shared_through_the_file_beside_the_store(tmp_path: Path) -> None:
    assert signal_path_for(f"sqlite:///{tmp_path}/m.db") == tmp_path / "m.db.dlpipe-routing"
    assert signal_path_for("sqlite:///:memory:") is None
    assert signal_path_for("http://mlflow:5000") is None
    writer, reader = RoutingSignal(tmp_path / "sig"), RoutingSignal(tmp_path / "sig")
    first = reader.read()
    assert writer.bump() and writer.bump()
    assert reader.read() == first + 2
    absent = RoutingSignal(None)
    assert absent.read() == -1 and not absent.bump() and not absent.available


def test_get_model_resolves_latest_numbers_and_aliases_and_caches(
    registry: ModelRegistry, package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2 = _register(registry, package, "getter", 2)
    assert Path(registry.get_model("getter")).name.startswith(f"{v2}-")
    registry.promote("getter", v1)
    for ref in ("champion", "@champion", v1, int(v1)):
        local = Path(registry.get_model("getter", ref))
        assert local.name.startswith(f"{v1}-")
        assert (local / "weights.pt").read_bytes() == (package / "weights.pt").read_bytes()
        assert json.loads((local / "metadata.json").read_text())["version"] == v1
    # A second call is served from the cache: no download.
    monkeypatch.setattr("mlflow.artifacts.download_artifacts", _fail)
    assert registry.get_model("getter", v1) == registry.get_model("getter", "@champion")


def _fail(*args: Any, **kwargs: Any) -> None:
    raise AssertionError("downloaded again")


def test_register_with_run_id_parent_version_and_dict_metadata(
    registry: ModelRegistry, package: Path
) -> None:
    (base,) = _register(registry, package, "derived", 1)
    client = registry.client
    experiment_id = client.create_experiment("derived-training")
    run = client.create_run(experiment_id)
    data = _meta("derived", parent_version=base).to_dict() | {"framework": "onnx"}
    data.pop("version")
    version = registry.register_model(package, data, run_id=run.info.run_id)
    assert data["version"] == version and int(version) == int(base) + 1
    meta = registry.get_metadata("derived", version)
    assert (meta.parent_version, meta.framework, meta.source_run_id) == (
        base,
        "onnx",
        run.info.run_id,
    )
    assert client.get_model_version("derived", version).run_id == run.info.run_id


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_path": "missing-dir"}, "not a directory"),
        ({"model_path": "empty"}, "none of"),
        ({"parent_version": "99"}, "no parent_version 99"),
        ({"run_id": "0" * 32}, "unknown run_id"),
        ({"drop": "precision"}, "missing required fields: precision"),
        ({"drop": "accuracy_metrics"}, "missing required fields: accuracy_metrics"),
    ],
)
def test_register_refuses_bad_input_and_stores_nothing(
    registry: ModelRegistry, package: Path, tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    _register(registry, package, "strict", 1)
    before = _snapshot(registry, "strict")
    (tmp_path / "empty").mkdir()
    model_path = tmp_path / change["model_path"] if "model_path" in change else package
    meta: Any = _meta("strict", parent_version=change.get("parent_version"))
    if "drop" in change:
        meta = meta.to_dict()
        del meta[change["drop"]]
    with pytest.raises(RegistryError, match=message):
        registry.register_model(model_path, meta, run_id=change.get("run_id"))
    assert _snapshot(registry, "strict") == before


def test_routing_latest_then_champion_then_ab_then_cleared(
    registry: ModelRegistry, package: Path
) -> None:
    v1, v2, v3 = _register(registry, package, "router", 3)
    assert registry.route_request("router") == (v3, "champion")  # no alias: latest
    registry.promote("router", v2)
    assert registry.get_model_for_request("router") == v2
    registry.set_ab_config("router", ABTestConfig(v1, v3, 1.0))
    assert registry.route_request("router", "k") == (v1, "ab_a")
    registry.set_ab_config("router", ABTestConfig(v1, v3, 0.0))
    assert registry.route_request("router", "k") == (v3, "ab_b")
    assert registry.get_ab_config("router") == ABTestConfig(v1, v3, 0.0)
    assert registry.clear_ab_config("router") is True
    assert registry.clear_ab_config("router") is False
    assert registry.get_model_for_request("router") == v2
    with pytest.raises(RegistryError, match="unknown model 'nobody'"):
        registry.get_model_for_request("nobody")


@pytest.mark.parametrize(
    ("a", "b", "split", "message"),
    [
        ("1", "2", 1.5, "within"),
        ("1", "2", -0.1, "within"),
        ("1", "2", float("nan"), "within"),
        ("1", "1", 0.5, "both"),
        ("1", "x", 0.5, "version number"),
    ],
)
def test_ab_config_rejects_impossible_values(a: str, b: str, split: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ABTestConfig(a, b, split)


def test_ab_config_refuses_unknown_versions_and_changes_nothing(
    registry: ModelRegistry, package: Path
) -> None:
    v1, v2 = _register(registry, package, "ab-check", 2)
    registry.set_ab_config("ab-check", ABTestConfig(v1, v2, 0.3))
    before = _snapshot(registry, "ab-check")
    with pytest.raises(RegistryError, match="no version 77"):
        registry.set_ab_config("ab-check", ABTestConfig(v1, "77", 0.5))
    with pytest.raises(RegistryError, match="unknown model"):
        registry.set_ab_config("no-such-model", ABTestConfig(v1, v2, 0.5))
    assert _snapshot(registry, "ab-check") == before


def test_rollback_clears_ab_and_records_audit_trail(registry: ModelRegistry, package: Path) -> None:
    v1, v2, v3 = _register(registry, package, "rolled", 3)
    registry.promote("rolled", v2)
    registry.set_ab_config("rolled", ABTestConfig(v2, v3, 0.9))
    result = registry.rollback("rolled", v1)
    assert result["to"] == v1 and sorted(result["rolled_back_from"]) == [v2, v3]
    assert registry.get_ab_config("rolled") is None
    assert {registry.get_model_for_request("rolled", str(k)) for k in range(200)} == {v1}
    history = registry.history("rolled")
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("promote", None, v2),
        ("ab_set", None, {"model_a_version": v2, "model_b_version": v3, "traffic_split": 0.9}),
        ("rollback", v2, v1),
    ]
    for entry in history:
        assert "@" in entry["user"] and datetime.fromisoformat(entry["time"]).tzinfo is not None
    with pytest.raises(RegistryError, match="no version 42"):
        registry.rollback("rolled", "42")
    assert registry.get_model_for_request("rolled") == v1


def test_unchanged_routing_needs_no_database_query(
    registry: ModelRegistry, package: Path, store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1, v2 = _register(registry, package, "cached", 2)
    registry.promote("cached", v1)
    registry.get_model_for_request("cached")
    calls = []
    original = registry.client.get_registered_model
    monkeypatch.setattr(
        registry.client, "get_registered_model", lambda n: calls.append(n) or original(n)
    )
    start = time.perf_counter()
    for i in range(5000):
        assert registry.get_model_for_request("cached", str(i)) == v1
    per_call = (time.perf_counter() - start) / 5000
    assert calls == [] and per_call < 1e-3
    # A change made by another registry object (as another process would) is seen at once.
    ModelRegistry(store).promote("cached", v2)
    assert registry.get_model_for_request("cached") == v2 and len(calls) == 1


def test_without_signal_the_ttl_bounds_staleness_and_rollback_waits_it_out(
    registry: ModelRegistry, package: Path, store: str
) -> None:
    v1, v2 = _register(registry, package, "ttl", 2)
    registry.promote("ttl", v2)
    ttl = 1.0
    reader = ModelRegistry(store, routing_ttl_s=ttl, use_routing_signal=False)
    writer = ModelRegistry(store, routing_ttl_s=ttl, use_routing_signal=False)
    fetched = time.monotonic()
    assert reader.get_model_for_request("ttl") == v2
    writer.promote("ttl", v1)
    if time.monotonic() - fetched < ttl * 0.9:  # still within the bound (a loaded box is slow)
        assert reader.get_model_for_request("ttl") == v2  # cached, as documented
    time.sleep(max(0.0, fetched + ttl - time.monotonic()) + 0.05)
    assert reader.get_model_for_request("ttl") == v1
    start = time.monotonic()
    writer.rollback("ttl", v2)
    assert time.monotonic() - start >= ttl
    assert reader.get_model_for_request("ttl") == v2


_CHILD_PRELUDE = """
import os, sys, time, warnings
warnings.filterwarnings("ignore")
from datetime import UTC, datetime
from dlpipe.config import PreprocessingConfig
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.registry import ModelRegistry
uri, name, workdir = sys.argv[1], sys.argv[2], sys.argv[3]
"""

_REGISTER_CHILD = """
registry = ModelRegistry(uri, cache_dir=os.path.join(workdir, "cache"))
meta = lambda: ModelMetadata(name, "onnx", "fp16", 0.5, datetime.now(UTC), {"acc": 0.7},
                             PreprocessingConfig())
open(os.path.join(workdir, f"ready-{os.getpid()}"), "w").close()
while not os.path.exists(os.path.join(workdir, "go")):
    time.sleep(0.005)
print(" ".join(registry.register_model(sys.argv[4], meta()) for _ in range(20)))
"""


def _spawn(code: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    script = textwrap.dedent(_CHILD_PRELUDE) + textwrap.dedent(code)
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.slow
def test_two_processes_registering_at_once_get_distinct_versions(
    registry: ModelRegistry, package: Path, store: str, tmp_path: Path
) -> None:
    children = [_spawn(_REGISTER_CHILD, store, "raced", str(tmp_path), str(package)) for _ in "ab"]
    _wait_for(lambda: len(list(tmp_path.glob("ready-*"))) == 2, 120, "both registrars")
    (tmp_path / "go").touch()  # both start registering at the same moment
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    versions = [v for out, _ in outputs for v in out.split()]
    assert len(versions) == 40 and len(set(versions)) == 40
    assert sorted(int(r["version"]) for r in registry.list_versions("raced")) == list(range(1, 41))


_READER_CHILD = """
use_signal = sys.argv[4] == "signal"
registry = ModelRegistry(uri, routing_ttl_s=0.25, use_routing_signal=use_signal)
log = open(os.path.join(workdir, "reads.log"), "w")
stop = os.path.join(workdir, "stop")
n = 0
while True:
    if n % 256 == 0 and os.path.exists(stop):
        break
    started = time.time_ns()
    version = registry.get_model_for_request(name, str(n))
    log.write(f"{started} {version}\\n")
    n += 1
    if n == 1000:
        log.flush()
        open(os.path.join(workdir, "ready"), "w").close()
log.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["signal", "ttl"])
def test_no_read_starting_after_rollback_returns_the_rolled_back_version(
    registry: ModelRegistry, package: Path, store: str, tmp_path: Path, mode: str
) -> None:
    name = f"live-{mode}"
    good, bad, challenger = _register(registry, package, name, 3)
    registry.promote(name, bad)
    registry.set_ab_config(name, ABTestConfig(bad, challenger, 0.5))
    reader = _spawn(_READER_CHILD, store, name, str(tmp_path), mode)
    _wait_for(lambda: (tmp_path / "ready").exists() or reader.poll() is not None, 120, "reader")
    time.sleep(0.2)
    writer = ModelRegistry(store, routing_ttl_s=0.25, use_routing_signal=(mode == "signal"))
    writer.rollback(name, good)
    returned_ns = time.time_ns()
    time.sleep(0.5)
    (tmp_path / "stop").touch()
    _, err = reader.communicate(timeout=60)
    assert reader.returncode == 0, err
    reads = [line.split() for line in (tmp_path / "reads.log").read_text().splitlines()]
    before = [v for t, v in reads if int(t) < returned_ns]
    after = [v for t, v in reads if int(t) >= returned_ns]
    assert {bad, challenger} <= set(before)  # the reader did see the old routing
    assert len(after) > 100
    assert set(after) == {good}, f"{len(after) - after.count(good)} reads after rollback"
