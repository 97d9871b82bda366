"""`train_keras` end to end on real data: MLflow run, checkpoints, registered tensorflow package,
then the package through tf2onnx, ONNX Runtime and static INT8 like any other model."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from keras_helpers import KERAS_CONFIG, TEXT_CONFIG, keras_weights
from mlflow.tracking import MlflowClient

from dlpipe.config import PipelineConfig, load_config
from dlpipe.data import DataPreprocessor, build_datamodule
from dlpipe.optimize.accuracy import evaluate_accuracy
from dlpipe.optimize.onnx_export import make_session
from dlpipe.optimize.quantize import onnx_size_mb, quantize_int8_static
from dlpipe.optimize.tf_export import export_keras_package
from dlpipe.tracking.package import load_package_config, load_package_metadata
from dlpipe.tracking.registry import ModelRegistry
from dlpipe.training.keras_checkpoint import read_state
from dlpipe.training.keras_fit import train_keras
from dlpipe.training.train import TrainResult

EPOCH_KEYS = ("train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1")


@pytest.fixture(scope="module")
def trained(
    module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PipelineConfig, TrainResult]:
    root = tmp_path_factory.mktemp("keras-train")
    cfg = load_config(
        KERAS_CONFIG,
        [
            "data.limit_train_samples=3000",
            "data.limit_eval_samples=500",
            "training.num_epochs=2",
            "training.batch_size=64",
            f"training.checkpoint_dir={root / 'checkpoints'}",
        ],
    )
    return cfg, train_keras(cfg)


@pytest.mark.slow
def test_run_holds_params_epoch_metrics_and_artifacts(
    trained: tuple[PipelineConfig, TrainResult], module_mlflow_uri: str
) -> None:
    cfg, result = trained
    client = MlflowClient(module_mlflow_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == cfg.flat_params()
    assert run.data.tags["dlpipe.framework"] == "tensorflow"
    contexts = sorted(t.value for d in run.inputs.dataset_inputs for t in d.tags)
    assert contexts == ["test", "training", "validation"]
    for key in EPOCH_KEYS:
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [0, 1], key
    losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    assert losses[1] < losses[0]
    assert set(result.metrics) == {"test/loss", "test/acc", "test/f1"}
    assert result.metrics["test/acc"] > 0.6  # 94 steps on 3000 images: far above chance
    for key, value in result.metrics.items():
        assert run.data.metrics[key] == pytest.approx(value)
    assert run.data.metrics["data/skipped_samples"] == 0
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"checkpoints", "preprocessing.json", "confusion_matrix.png", "model_summary.txt"} <= (
        artifacts
    )
    assert [a.path for a in client.list_artifacts(result.run_id, "checkpoints")] == [
        "checkpoints/best.keras"
    ]
    png = Path(client.download_artifacts(result.run_id, "confusion_matrix.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = Path(client.download_artifacts(result.run_id, "model_summary.txt")).read_text()
    assert "conv0_0" in summary and "Total params" in summary


@pytest.mark.slow
def test_checkpoints_carry_sha256_sidecars(trained: tuple[PipelineConfig, TrainResult]) -> None:
    _, result = trained
    run_dir = Path(result.checkpoint or "").parent
    for name in ("last.keras", "best.keras"):
        digest, file_name = (run_dir / f"{name}.sha256").read_text().split()
        assert file_name == name
        assert digest == hashlib.sha256((run_dir / name).read_bytes()).hexdigest()


@pytest.mark.slow
def test_registered_version_is_a_tensorflow_package(
    trained: tuple[PipelineConfig, TrainResult], module_mlflow_uri: str
) -> None:
    _, result = trained
    registry = ModelRegistry(module_mlflow_uri)
    meta = registry.get_metadata(result.model_name, result.model_version)
    assert meta.framework == "tensorflow" and meta.precision == "fp32"
    assert meta.source_run_id == result.run_id and meta.accuracy_metrics == result.metrics
    package = Path(registry.get_model(result.model_name, result.model_version))
    assert {"config.yaml", "preprocessing.json", "metadata.json", "model.keras"} <= {
        p.name for p in package.iterdir()
    }
    assert load_package_config(package).model.framework == "tensorflow"
    size = (package / "model.keras").stat().st_size / 1e6
    assert meta.model_size_mb == pytest.approx(size, abs=1e-4)  # MB, 4 decimals
    # The package holds the tested (best) weights and no optimizer state.
    packaged = keras_weights(package / "model.keras")
    best = keras_weights(result.checkpoint or "", prefix="layers/")
    assert packaged.keys() == best.keys()
    for key, value in packaged.items():
        np.testing.assert_array_equal(value, best[key], err_msg=key)
    assert load_package_metadata(package).preprocessing_config.class_names


def _test_batches(cfg: PipelineConfig, limit: int, batch: int = 100) -> list[Any]:
    dm = build_datamodule(cfg)
    pre = DataPreprocessor(cfg.preprocessing)
    raw = dm.raw_samples("test", limit)
    return [
        (torch.from_numpy(pre.preprocess_inference_batch([s for s, _ in raw[i : i + batch]])),
         torch.tensor([y for _, y in raw[i : i + batch]]))
        for i in range(0, len(raw), batch)
    ]  # fmt: skip


@pytest.mark.slow
def test_package_exports_with_parity_and_quantizes_to_int8(
    trained: tuple[PipelineConfig, TrainResult], tmp_path: Path
) -> None:
    cfg, result = trained
    batches = _test_batches(cfg, 500)
    images = batches[0][0].numpy()
    assert images.shape == (100, 1, 28, 28)
    exported = export_keras_package(
        result.package_dir or "", tmp_path / "model.onnx", parity_inputs=[images]
    )
    assert exported.max_abs_diff <= 1e-4
    # ONNX Runtime reproduces the test accuracy Keras logged (same 500 images).
    fp32 = evaluate_accuracy(make_session(exported.path), batches)
    assert fp32 == pytest.approx(result.metrics["test/acc"], abs=0.002)

    dm = build_datamodule(cfg)
    pre = DataPreprocessor(cfg.preprocessing)
    calibration = [pre.preprocess_inference_batch(dm.calibration_samples(256))]
    int8 = quantize_int8_static(exported.path, tmp_path / "model.int8.onnx", calibration)
    assert onnx_size_mb(int8.path) <= 0.30 * onnx_size_mb(exported.path)
    assert evaluate_accuracy(int8.path, batches) >= fp32 - 0.01


@pytest.mark.slow
def test_text_model_trains_and_packages_its_tokenizer(tmp_path: Path, tmp_mlflow_uri: str) -> None:
    cfg = load_config(
        TEXT_CONFIG,
        [
            "data.limit_train_samples=1500",
            "data.limit_eval_samples=200",
            "training.num_epochs=2",
            f"training.checkpoint_dir={tmp_path / 'checkpoints'}",
        ],
    )
    result = train_keras(cfg)
    client = MlflowClient(tmp_mlflow_uri)
    losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    assert len(losses) == 2 and losses[1] < losses[0]
    package = Path(result.package_dir or "")
    assert (package / "tokenizer.json").is_file() and (package / "model.keras").is_file()
    meta = load_package_metadata(package)
    assert meta.framework == "tensorflow" and meta.preprocessing_config.class_names == [
        "negative",
        "positive",
    ]
    exported = export_keras_package(package, tmp_path / "text.onnx")
    assert exported.input_names == ["input_ids", "attention_mask"]
    assert exported.max_abs_diff <= 1e-4


def test_train_keras_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"model\.framework: tensorflow"):
        train_keras(load_config(None))
    with pytest.raises(ValueError, match=r"model\.weights_path"):
        train_keras(load_config(KERAS_CONFIG, [f"model.weights_path={tmp_path / 'w.keras'}"]))


@pytest.mark.slow
def test_bf16_mixed_precision_trains_and_exports_in_float32(
    keras_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str, tmp_path: Path
) -> None:
    cfg = keras_config(
        "data.limit_train_samples=512",
        "training.precision=bf16-mixed",
        "tracking.register_model=false",
    )
    result = train_keras(cfg)
    assert result.metrics["test/acc"] > 0.2  # it learns (chance: 0.1)
    package = Path(result.package_dir or "")
    assert load_package_metadata(package).format_details["training_precision"] == "bf16-mixed"
    # Keras layers keep the mixed_bfloat16 policy; the export computes in float32 throughout.
    exported = export_keras_package(package, tmp_path / "bf16.onnx")
    assert exported.max_abs_diff <= 1e-4
    graph = onnx.load(str(exported.path)).graph
    casts = [a.i for n in graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    assert onnx.TensorProto.BFLOAT16 not in casts


def test_early_stopping_ends_the_run_and_tests_the_best_epoch(
    keras_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    # The one-cycle learning rate rises through warm-up (30 % of 5 epochs), so monitored with
    # mode "min" it stops improving after epoch 0: patience 1 ends the run after epoch 1.
    cfg = keras_config(
        "data.limit_train_samples=512",
        "training.num_epochs=5",
        "training.monitor=train/lr",
        "training.monitor_mode=min",
        "training.early_stopping_patience=1",
        "training.accumulate_grad_batches=2",
        "training.gradient_clip_val=1.0",
        "tracking.register_model=false",
    )
    result = train_keras(cfg)
    history = MlflowClient(tmp_mlflow_uri).get_metric_history(result.run_id, "train/lr")
    assert [m.step for m in history] == [0, 1] and history[1].value > history[0].value
    state = read_state(result.checkpoint or "")
    assert Path(result.checkpoint or "").name == "best.keras"
    assert state["epoch"] == 1 and state["best_epoch"] == 0  # the tested model is epoch 0's
    assert read_state(Path(result.checkpoint or "").with_name("last.keras"))["epoch"] == 2
