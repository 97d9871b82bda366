"""ExperimentTracker against a real sqlite MLflow store."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import mlflow
import pytest
from lightning.fabric.utilities.rank_zero import rank_zero_only
from mlflow.tracking import MlflowClient

from dlpipe.tracking.experiment import ExperimentTracker, TrackingError


@pytest.fixture
def as_rank() -> Iterator[Callable[[int], None]]:
    """Set this process's global rank the way Lightning does in a DDP worker."""
    before = getattr(rank_zero_only, "rank", 0)

    def set_rank(rank: int) -> None:
        rank_zero_only.rank = rank

    yield set_rank
    rank_zero_only.rank = before


def test_run_lifecycle_logs_params_metrics_artifacts_and_registers(
    tmp_mlflow_uri: str, tmp_path: Path
) -> None:
    tracker = ExperimentTracker(experiment_name="lifecycle")
    assert tracker.tracking_uri == tmp_mlflow_uri  # MLFLOW_TRACKING_URI wins over the default
    run_id = tracker.start_run("r1", {"training.learning_rate": 0.01, "model.name": "simple_cnn"})
    tracker.log_metrics({"train/loss": 1.5, "val/acc": 0.5}, step=0)
    tracker.log_metrics({"train/loss": 1.0, "val/acc": 0.7}, step=1)
    note = tmp_path / "summary.txt"
    note.write_text("hello")
    tracker.log_artifact(str(note))
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "weights.pt").write_bytes(b"123")
    assert tracker.register_model(str(package), "lifecycle_model") == "1"
    assert tracker.register_model(str(package), "lifecycle_model") == "2"
    tracker.end_run()
    assert tracker.run_id is None

    client = MlflowClient(tmp_mlflow_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params == {"training.learning_rate": "0.01", "model.name": "simple_cnn"}
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 1.0)]
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.txt", "model"} <= names
    version = client.get_model_version("lifecycle_model", "2")
    assert version.run_id == run_id
    assert client.get_experiment_by_name("lifecycle") is not None


def test_default_store_is_mlflows_own_when_no_uri_is_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert ExperimentTracker().tracking_uri == mlflow.get_tracking_uri()


def test_misuse_gets_clear_errors(tmp_mlflow_uri: str, tmp_path: Path) -> None:
    tracker = ExperimentTracker()
    with pytest.raises(TrackingError, match="start_run"):
        tracker.log_metrics({"a": 1.0}, step=0)
    tracker.start_run("r", {})
    with pytest.raises(ValueError, match="'val/loss' is not a finite number"):
        tracker.log_metrics({"val/loss": float("nan")}, step=0)
    with pytest.raises(FileNotFoundError, match="artifact not found"):
        tracker.log_artifact(str(tmp_path / "missing.txt"))
    tracker.end_run("FAILED")


def test_only_rank_zero_writes(tmp_mlflow_uri: str, as_rank: Callable[[int], None]) -> None:
    tracker = ExperimentTracker()
    run_id = tracker.start_run("ranks", {"a": 1})
    worker_copy = pickle.loads(pickle.dumps(tracker))  # what a DDP/Ray worker receives
    assert worker_copy.run_id == run_id
    as_rank(1)
    worker_copy.log_metrics({"val/acc": 0.1}, step=0)
    worker_copy.log_params({"b": 2})
    as_rank(0)
    worker_copy.log_metrics({"val/acc": 0.9}, step=0)
    tracker.end_run()
    client = MlflowClient(tmp_mlflow_uri)
    assert [m.value for m in client.get_metric_history(run_id, "val/acc")] == [0.9]
    assert client.get_run(run_id).data.params == {"a": "1"}


def test_each_registered_version_keeps_its_own_files(tmp_mlflow_uri: str, tmp_path: Path) -> None:
    tracker = ExperimentTracker(experiment_name="versions")
    run_id = tracker.start_run("two-versions", {})
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "weights.pt").write_text("first")
    assert tracker.register_model(str(package), "twice") == "1"
    (package / "weights.pt").write_text("second")
    (package / "extra.txt").write_text("only in the second")
    assert tracker.register_model(str(package), "twice") == "2"
    tracker.end_run()

    client = MlflowClient(tmp_mlflow_uri)
    sources = {v: client.get_model_version("twice", v).source for v in ("1", "2")}
    files = {}
    for version, source in sources.items():
        local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path / version)))
        files[version] = {p.name: p.read_text() for p in local.iterdir()}
    assert files["1"] == {"weights.pt": "first"}
    assert files["2"] == {"weights.pt": "second", "extra.txt": "only in the second"}
    assert sources["1"] != sources["2"]
    assert {a.path for a in client.list_artifacts(run_id)} == {"model", "model-2"}
