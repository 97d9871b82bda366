"""`training.profiler`: Lightning's profilers time the fit and their report lands in the MLflow run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler
from mlflow.tracking import MlflowClient

from dlpipe.config import PipelineConfig
from dlpipe.tracking.experiment import ExperimentTracker
from dlpipe.training import train
from dlpipe.training.profiling import build_profiler
from dlpipe.training.trainer import DistributedTrainer

from .conftest import small_config, tiny_datamodule, tiny_model


def test_simple_profiler_report_is_logged_to_the_run(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    result = train(fmnist_config("training.profiler=simple"))
    client = MlflowClient(tmp_mlflow_uri)
    logged = [a.path for a in client.list_artifacts(result.run_id, "profiler")]
    assert logged == ["profiler/fit-profile.txt"]
    report = Path(client.download_artifacts(result.run_id, "profiler/fit-profile.txt"))
    text = report.read_text()
    # The table times the training loop's own actions: where an epoch's time went.
    assert "Action" in text and "run_training_epoch" in text and "run_training_batch" in text


def test_no_profiler_logs_nothing(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    result = train(fmnist_config())
    assert MlflowClient(tmp_mlflow_uri).list_artifacts(result.run_id, "profiler") == []


@pytest.mark.parametrize(
    ("kind", "expected", "marker"),
    [
        ("advanced", AdvancedProfiler, "function calls"),  # cProfile's per-function statistics
        ("pytorch", PyTorchProfiler, "Self CPU"),  # torch.profiler's operator table
    ],
)
def test_other_profilers_write_their_report_to_the_run(
    tmp_path: Path, tmp_mlflow_uri: str, kind: str, expected: type, marker: str
) -> None:
    assert isinstance(build_profiler(kind, tmp_path), expected)  # type: ignore[arg-type]
    cfg = small_config(tmp_path / "ckpt", f"training.profiler={kind}", "training.num_epochs=1")
    tracker = ExperimentTracker(tmp_mlflow_uri, "profiling")
    run_id = tracker.start_run(kind, {})
    model = tiny_model(0, 8, 3, total_steps=8)
    DistributedTrainer(cfg, tracker).train(model, tiny_datamodule(0, 256, 8, 3, 32))
    tracker.end_run()
    client = MlflowClient(tmp_mlflow_uri)
    logged = [a.path for a in client.list_artifacts(run_id, "profiler") if not a.is_dir]
    assert "profiler/fit-profile.txt" in logged
    text = Path(client.download_artifacts(run_id, "profiler/fit-profile.txt")).read_text()
    assert marker in text


def test_build_profiler_off_and_simple(tmp_path: Path) -> None:
    assert build_profiler(None, tmp_path) is None
    assert isinstance(build_profiler("simple", tmp_path), SimpleProfiler)
