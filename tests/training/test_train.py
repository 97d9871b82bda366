"""End to end: `train(cfg)` on real Fashion-MNIST, logged to MLflow and registered."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dlpipe.config import PipelineConfig
from dlpipe.tracking.package import load_package_metadata, load_torch_model
from dlpipe.training import TrainingError, build_lightning_model, train
from dlpipe.training.trainer import DistributedTrainer


@pytest.mark.slow
def test_train_logs_everything_and_registers_a_version(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    cfg = fmnist_config(
        "data.limit_train_samples=2000",
        "data.limit_eval_samples=500",
        "training.batch_size=100",
        "training.learning_rate=0.005",
    )
    result = train(cfg)

    assert result.model_name == "fashion_mnist_cnn" and result.model_version == "1"
    assert set(result.metrics) == {"test/acc", "test/f1", "test/loss"}
    assert result.metrics["test/acc"] > 0.3  # 20 steps on 2000 images: well above chance (0.1)
    assert result.checkpoint and Path(result.checkpoint).is_file()

    client = MlflowClient(tmp_mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == cfg.flat_params()
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "val/f1", "test/acc"):
        assert key in run.data.metrics, key
    assert run.data.metrics["data/skipped_samples"] == 0
    assert run.data.metrics["test/acc"] == pytest.approx(result.metrics["test/acc"])
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoints", "preprocessing.json", "confusion_matrix.png", "model_summary.txt"} <= (
        artifacts
    )
    png = Path(client.download_artifacts(result.run_id, "confusion_matrix.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    version = client.get_model_version(result.model_name, result.model_version)
    assert version.run_id == result.run_id
    package = Path(result.package_dir or "")
    metadata = load_package_metadata(package)
    assert metadata.framework == "pytorch" and metadata.precision == "fp32"
    assert metadata.model_size_mb > 0 and metadata.source_run_id == result.run_id
    assert metadata.accuracy_metrics == result.metrics
    assert metadata.preprocessing_config == cfg.preprocessing
    # The packaged weights are the tested (best) model.
    net = load_torch_model(package)
    best = torch.load(result.checkpoint, weights_only=True)["state_dict"]
    for key, value in net.state_dict().items():
        assert torch.equal(value, best[f"net.{key}"])


def test_cuda_out_of_memory_stops_with_batch_size_advice(
    fmnist_config: Callable[..., PipelineConfig], tmp_path: Path
) -> None:
    # No GPU here: the network raises the error CUDA would raise on the first forward.
    cfg = fmnist_config("training.batch_size=64")
    model = build_lightning_model(cfg)

    def exhausted(*args: object) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.net.forward = exhausted  # type: ignore[method-assign]
    from dlpipe.data import build_datamodule

    with pytest.raises(TrainingError, match=r"batch_size=64.*-o training.batch_size=32"):
        DistributedTrainer(cfg, checkpoint_dir=tmp_path).train(model, build_datamodule(cfg))


def test_cli_json_contract(
    fmnist_config: Callable[..., PipelineConfig],
    tmp_mlflow_uri: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from dlpipe.config import save_config
    from dlpipe.training.cli import main

    config_file = tmp_path / "tiny.yaml"
    save_config(fmnist_config(), config_file)
    code = main(["-c", str(config_file), "-o", "training.learning_rate=0.01", "--json"])
    assert code == 0
    out, err = capsys.readouterr()
    assert "dlpipe train" in err  # the summary table: on stderr, stdout is the JSON alone
    payload = json.loads(out)
    assert set(payload) == {"run_id", "model_name", "model_version", "metrics", "checkpoint"}
    assert payload["model_version"] == "1" and 0.0 <= payload["metrics"]["test/acc"] <= 1.0
    run = MlflowClient(tmp_mlflow_uri).get_run(payload["run_id"])
    assert run.data.params["training.learning_rate"] == "0.01"

    # --resume without -c takes the config stored in the checkpoint.
    code = main(["--resume", payload["checkpoint"], "--json"])
    assert code == 0
    resumed = json.loads(capsys.readouterr().out)
    assert resumed["model_version"] == "2"
    # A resume that would change the schedule is refused in one clear line.
    code = main(["--resume", payload["checkpoint"], "-o", "training.num_epochs=3"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1
    assert "training.num_epochs=1 -> 3" in err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["training.learning_rate=-1"], "training.learning_rate"),
        (["training.lerning_rate=0.1"], "training.lerning_rate: unknown key"),
        (["model.name=resnet9000"], "unknown model 'resnet9000'"),
        (["training.num_gpus=64"], "num_gpus=64"),
    ],
)
def test_config_errors_exit_2_before_any_work(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    overrides: list[str],
    message: str,
) -> None:
    from dlpipe.training.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml"
    argv = ["-c", str(config)]
    for item in overrides:
        argv += ["-o", item]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []  # no store, no checkpoints: nothing started


def test_cli_without_config_or_resume_is_a_config_error(capsys: pytest.CaptureFixture[str]) -> None:
    from dlpipe.training.cli import main

    assert main([]) == 2
    assert "-c CONFIG.yaml" in capsys.readouterr().err
