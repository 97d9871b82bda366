"""A Keras config through the command line: `dlpipe train` registers a tensorflow version (and
resumes from a `.keras` checkpoint without -c), `dlpipe optimize` builds its ONNX variants from
tf2onnx, and `train()` sends tensorflow configs to the Keras path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from keras_helpers import KERAS_CONFIG
from lightning.pytorch.callbacks import Callback
from mlflow.tracking import MlflowClient

from dlpipe.config import load_config
from dlpipe.optimize.onnx_export import ExportError
from dlpipe.optimize.variants import optimize_version
from dlpipe.tracking.package import load_package_metadata
from dlpipe.tracking.registry import ModelRegistry
from dlpipe.training.train import train

NAME = "keras_cli_test"


def _dlpipe(
    args: list[str], cwd: Path, uri: str, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`dlpipe train -c configs/fashion_mnist_keras.yaml --json` on a slice of the data."""
    root = tmp_path_factory.mktemp("keras-cli")
    args = [
        "train", "-c", str(KERAS_CONFIG), "-o", "data.limit_train_samples=3000",
        "-o", "data.limit_eval_samples=500", "-o", "training.num_epochs=2",
        "-o", f"tracking.registered_model_name={NAME}",
        "-o", f"training.checkpoint_dir={root / 'checkpoints'}", "--json",
    ]  # fmt: skip
    proc = _dlpipe(args, root, module_mlflow_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout)  # stdout is the JSON alone
    result["root"] = root
    return result


@pytest.mark.slow
def test_train_command_registers_a_tensorflow_version(
    trained: dict[str, Any], module_mlflow_uri: str
) -> None:
    assert trained["model_name"] == NAME and trained["model_version"] == "1"
    assert trained["checkpoint"].endswith(".keras")
    meta = ModelRegistry(module_mlflow_uri).get_metadata(NAME, "1")
    assert meta.framework == "tensorflow"
    assert meta.accuracy_metrics["test/acc"] == pytest.approx(trained["metrics"]["test/acc"])
    assert trained["metrics"]["test/acc"] > 0.6  # far above chance (0.1)


@pytest.mark.slow
def test_resume_from_a_keras_checkpoint_needs_no_config(
    trained: dict[str, Any], module_mlflow_uri: str
) -> None:
    # The run is complete: resuming from its last.keras trains no further epoch, then tests,
    # packages and registers again, with the config read from the checkpoint.
    last = str(Path(trained["checkpoint"]).with_name("last.keras"))
    proc = _dlpipe(["train", "--resume", last, "--json"], trained["root"], module_mlflow_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(proc.stdout)
    assert resumed["model_name"] == NAME and resumed["model_version"] not in (None, "1")
    run = MlflowClient(module_mlflow_uri).get_run(resumed["run_id"])
    assert run.data.tags["dlpipe.framework"] == "tensorflow"
    assert run.data.tags["dlpipe.resumed_from"] == last
    assert run.data.params["data.limit_train_samples"] == "3000"  # the checkpoint's config


def test_resume_usage_errors_exit_2_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dlpipe import cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fake = tmp_path / "last.keras"
    fake.write_bytes(b"not a zip archive")
    torch_config = str(KERAS_CONFIG.with_name("fashion_mnist.yaml"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    for i, (args, message) in enumerate((
        (["--resume", str(fake)], "cannot be read"),
        (["--resume", str(fake), "-c", torch_config], "is a Keras checkpoint but"),
        (["--resume", str(tmp_path / "x.ckpt"), "-c", str(KERAS_CONFIG)], "PyTorch checkpoint"),
    )):  # fmt: skip
        if i == 0:  # through a real process once; refused before TensorFlow starts, so the
            proc = _dlpipe(["train", *args], tmp_path, uri, timeout=120)  # others run here
            code, err = proc.returncode, proc.stderr
        else:
            capsys.readouterr()
            code, err = cli.main(["train", *args]), capsys.readouterr().err
        assert code == 2, (args, err[-2000:])
        [line] = err.strip().splitlines()
        assert line.startswith("dlpipe train: error:") and message in line, line
    assert not (tmp_path / "mlflow.db").exists()  # refused before any work


def test_train_refuses_lightning_callbacks_for_keras(tmp_mlflow_uri: str) -> None:
    cfg = load_config(KERAS_CONFIG, ["training.num_epochs=1"])
    with pytest.raises(ValueError, match="Lightning callbacks"):
        train(cfg, callbacks=[Callback()])
    # Refused before any work: not even the run's experiment exists.
    assert MlflowClient(tmp_mlflow_uri).get_experiment_by_name("fashion_mnist_keras") is None


@pytest.mark.slow
def test_optimize_builds_onnx_variants_of_a_keras_version(
    trained: dict[str, Any], module_mlflow_uri: str
) -> None:
    args = ["optimize", f"{NAME}:1", "--targets", "onnx,int8,pruned", "--json"]
    proc = _dlpipe(args, trained["root"], module_mlflow_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["parent_framework"] == "tensorflow" and report["test_samples"] == 500
    # The baseline is Keras's own accuracy, as the training run measured it.
    assert report["baseline_accuracy"] == pytest.approx(trained["metrics"]["test/acc"], abs=0.002)
    assert report["baseline_latency"]["p50_ms"] > 0  # the FP32 ONNX graph, timed here
    v = {x["target"]: x for x in report["variants"]}
    assert v["pruned"]["status"] == "skipped" and v["pruned"]["reason"] == "needs PyTorch weights"
    onnx, int8 = v["onnx"], v["int8"]
    assert onnx["status"] == "kept" and int8["status"] == "kept", (onnx, int8)
    assert onnx["details"]["exporter"] == "tf2onnx"
    assert onnx["details"]["max_abs_diff"] <= 1e-4  # on the first 100 test images
    assert int8["size_mb"] <= 0.30 * onnx["size_mb"]
    assert int8["drop"] <= 0.01

    registry = ModelRegistry(module_mlflow_uri)
    client = MlflowClient(module_mlflow_uri)
    parent_run = registry.get_metadata(NAME, "1").source_run_id
    for variant in (onnx, int8):
        meta = registry.get_metadata(NAME, variant["version"])
        assert meta.framework == "onnx" and meta.parent_version == "1"
        assert meta.format_details["target"] == variant["target"]
        package = Path(registry.get_model(NAME, variant["version"]))
        assert (package / "model.onnx").is_file() and not (package / "model.keras").exists()
        assert load_package_metadata(package).precision == variant["precision"]
        tags = client.get_run(variant["run_id"]).data.tags
        assert tags["mlflow.parentRunId"] == parent_run  # a child run of the training run


@pytest.mark.slow
def test_a_failed_keras_export_fails_the_onnx_variants_only(
    trained: dict[str, Any], module_mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dlpipe.optimize.tf_export as tf_export

    def broken(*_: Any, **__: Any) -> Any:  # what tf2onnx does with an op it cannot convert
        raise ExportError("tf2onnx export of model.keras failed: unsupported op FancyOp")

    monkeypatch.setattr(tf_export, "export_and_predict", broken)
    report = optimize_version(
        NAME, "1", ["onnx", "int8", "pruned"], registry=ModelRegistry(module_mlflow_uri),
        register=False, measure=False,
    )  # fmt: skip
    status = {v.target: (v.status, v.reason) for v in report.variants}
    assert status["onnx"][0] == status["int8"][0] == "failed"
    assert "FancyOp" in status["onnx"][1] and "no FP32 ONNX graph" in status["int8"][1]
    assert status["pruned"] == ("skipped", "needs PyTorch weights")
    # The parent's accuracy still comes from Keras itself.
    assert report.baseline_accuracy == pytest.approx(trained["metrics"]["test/acc"], abs=0.002)
