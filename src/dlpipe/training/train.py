"""`train(cfg)`: data + model + trainer + tracking + registration, as one importable function.

    from dlpipe.config import load_config
    from dlpipe.training import train
    result = train(load_config("configs/fashion_mnist.yaml"))
    print(result.metrics["test/acc"], result.model_version)

The run logs every config field as a param, every epoch's train/val metrics, the test metrics,
the skipped-sample count and artifacts (best checkpoint, preprocessing config, confusion matrix,
model summary); the tested model is written as a model package and registered as a new version.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from dlpipe.config import PipelineConfig
from dlpipe.quality.profile import save_training_profile
from dlpipe.tracking.experiment import ExperimentTracker
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.package import save_model_package
from dlpipe.training.artifacts import save_confusion_matrix_png, save_model_summary
from dlpipe.training.checkpoint import (
    config_from_checkpoint,
    load_checkpoint_file,
    load_verified_checkpoint,
)
from dlpipe.training.devices import check_devices, launched_rank
from dlpipe.training.module import LightningModel
from dlpipe.training.trainer import DistributedTrainer, TrainingError


@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: str
    model_name: str
    model_version: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    """Test-split metrics: `test/acc`, `test/f1`, `test/loss`."""
    checkpoint: str | None = None
    """Best checkpoint (by `training.monitor`), else the last one."""
    package_dir: str | None = None


def build_lightning_model(cfg: PipelineConfig) -> LightningModel:
    """The configured network (`dlpipe.models.create_model`) inside the training recipe."""
    from dlpipe.models import create_model

    m, t = cfg.model, cfg.training
    net = create_model(
        m.name,
        m.num_classes,
        m.in_channels,
        pretrained=m.pretrained,
        weights_path=m.weights_path,
        dropout=m.dropout,
        **m.extra,
    )
    return LightningModel(
        net,
        num_classes=m.num_classes,
        task=cfg.preprocessing.task_type,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        scheduler=t.scheduler,
    )


def register_package(tracker: ExperimentTracker, package_dir: Path, metadata: ModelMetadata) -> str:
    """Register a model package as a new version carrying `metadata`; returns the version."""
    try:
        from dlpipe.tracking.registry import ModelRegistry
    except ImportError:  # registry not installed: plain MLflow registration plus tags
        version = tracker.register_model(str(package_dir), metadata.model_name)
        metadata.version = version
        for key, value in metadata.to_dict().items():
            tracker.client.set_model_version_tag(metadata.model_name, version, key, str(value))
        return version
    registry = ModelRegistry(tracker.registry_uri)
    return registry.register_model(package_dir, metadata, run_id=tracker.run_id)


# Fields that size the LR schedule and the step count: a resume must keep them.
PLAN_FIELDS = (
    "num_epochs",
    "max_steps",
    "batch_size",
    "accumulate_grad_batches",
    "scheduler",
    "num_processes",
    "num_nodes",
    "strategy",
    "limit_train_batches",
)


def check_resume_plan(
    cfg: PipelineConfig, checkpoint: Path, contents: dict[str, Any] | None = None
) -> None:
    """Refuse a resume whose schedule-defining settings differ from the checkpoint's run.

    Args:
        contents: the checkpoint already loaded; else it is loaded (weights only).
    """
    if contents is None:
        contents = load_checkpoint_file(checkpoint)
    stored = config_from_checkpoint(contents)
    if stored is None:
        return
    before = stored.get("training", {})
    changed = [
        f"training.{key}={before.get(key)!r} -> {getattr(cfg.training, key)!r}"
        for key in PLAN_FIELDS
        if key in before and before[key] != getattr(cfg.training, key)
    ]
    if changed:
        raise TrainingError(
            f"cannot resume {checkpoint} with a different training plan ({'; '.join(changed)}); "
            "keep these settings, or start a new run with model.weights_path set to the checkpoint"
        )


def train(
    cfg: PipelineConfig,
    resume_from: str | None = None,
    *,
    callbacks: list[Callback] | None = None,
    datamodule: pl.LightningDataModule | None = None,
) -> TrainResult:
    """Train, test, package and register one model as `cfg` describes.

    Args:
        cfg: the pipeline config.
        resume_from: checkpoint to resume from (verified; a corrupted one falls back to the
            previous verified checkpoint beside it, with a warning; one without a checksum is
            used as named). Loaded weights-only: a file that needs code to unpickle is refused.
        callbacks: extra Lightning callbacks (PyTorch runs only).
        datamodule: use this instead of `dlpipe.data.build_datamodule(cfg)`.

    `model.framework: tensorflow` runs `dlpipe.training.keras_fit.train_keras` (TensorFlow in
    worker processes; this one never imports it) with the same result, run and registration.
    """
    if cfg.model.framework == "tensorflow":
        if callbacks:
            # Lightning callbacks hook into a Lightning Trainer; a Keras run has none to call.
            raise ValueError(
                "callbacks= are Lightning callbacks and a Keras run (model.framework: "
                "tensorflow) cannot call them; train without them or use a PyTorch model"
            )
        from dlpipe.training.keras_fit import train_keras

        return train_keras(cfg, resume_from, datamodule=datamodule)
    if launched_rank() > 0:
        # A rank of a job torchrun / srun / a Kubernetes Job started: it fits, rank 0 alone
        # logs and registers (dlpipe.training.launch).
        from dlpipe.training.launch import train_other_rank

        return train_other_rank(cfg, resume_from, callbacks=callbacks, datamodule=datamodule)
    check_devices(cfg.training)
    resume_path = None
    if resume_from:
        resume_path, contents = load_verified_checkpoint(resume_from)
        check_resume_plan(cfg, resume_path, contents)
    pl.seed_everything(cfg.training.seed, workers=True, verbose=False)
    if datamodule is None:
        from dlpipe.data import build_datamodule

        datamodule = build_datamodule(cfg)
    model = build_lightning_model(cfg)
    tracker = ExperimentTracker(cfg.tracking.tracking_uri, cfg.training.experiment_name)
    tracker.start_run(cfg.name, cfg.flat_params())
    if resume_path is not None:
        tracker.set_tags({"dlpipe.resumed_from": str(resume_path)})
    try:
        result = _train_tracked(cfg, model, datamodule, tracker, resume_path, callbacks)
    except BaseException:
        tracker.end_run("FAILED")
        raise
    tracker.end_run()
    return result


def _train_tracked(
    cfg: PipelineConfig,
    model: LightningModel,
    datamodule: pl.LightningDataModule,
    tracker: ExperimentTracker,
    resume_path: Path | None,
    callbacks: list[Callback] | None,
) -> TrainResult:
    run_id = tracker.run_id
    assert run_id is not None
    # A resumed run keeps writing beside its checkpoint, so top-k and `last` stay continuous.
    checkpoint_dir = (
        resume_path.parent if resume_path else Path(cfg.training.checkpoint_dir) / run_id
    )
    runner = DistributedTrainer(cfg, tracker, callbacks, checkpoint_dir)
    runner.resume_path = resume_path  # already resolved and loaded by train()
    outcome = runner.train(model, datamodule)
    best = outcome.best_checkpoint or outcome.last_checkpoint
    if best:  # test and ship the best epoch, not merely the last one
        model.load_state_dict(load_checkpoint_file(best, require_checksum=True)["state_dict"])
    test_metrics = runner.test(model, datamodule)
    skipped = float(getattr(datamodule, "skipped_samples", 0))
    tracker.log_metrics({**test_metrics, "data/skipped_samples": skipped}, step=outcome.epochs)
    _log_datasets(cfg, datamodule, tracker)

    class_names = list(getattr(datamodule, "class_names", []) or [])
    with tempfile.TemporaryDirectory(prefix="dlpipe-train-") as tmp:
        work = Path(tmp)
        _log_artifacts(cfg, model, datamodule, tracker, work, best, class_names)
        model_name = cfg.tracking.registered_model_name or cfg.training.experiment_name
        preprocessing = cfg.preprocessing
        package_cfg = cfg
        if class_names and not preprocessing.class_names:
            preprocessing = preprocessing.model_copy(update={"class_names": class_names})
            # The package's own config too: the server and the pyfunc label with its names.
            package_cfg = cfg.model_copy(update={"preprocessing": preprocessing})
        metadata = ModelMetadata(
            model_name=model_name,
            framework="pytorch",
            precision="fp32",
            model_size_mb=0.0,  # filled from weights.pt by save_model_package
            training_date=utc_now(),
            accuracy_metrics=test_metrics,
            preprocessing_config=preprocessing,
            source_run_id=run_id,
            format_details={"strategy": cfg.training.strategy, "epochs": outcome.epochs},
        )
        package_dir = Path(cfg.training.checkpoint_dir) / run_id / "model"
        save_model_package(package_dir, package_cfg, metadata, net=model.net)
        # What the server compares live traffic with (drift): the held-out inputs and the
        # classes predicted on the test split (the confusion matrix's columns).
        confusion = model.test_confusion.compute().cpu().numpy()
        save_training_profile(package_dir, datamodule, confusion)
        version = None
        if cfg.tracking.register_model:
            version = register_package(tracker, package_dir, metadata)
    return TrainResult(
        run_id=run_id,
        model_name=model_name,
        model_version=version,
        metrics=test_metrics,
        checkpoint=best,
        package_dir=str(package_dir),
    )


def _log_datasets(cfg: PipelineConfig, datamodule: Any, tracker: ExperimentTracker) -> None:
    """The train/val/test splits as `mlflow.data` inputs of the run (dlpipe's own DataModule;
    a DataModule passed in without `raw_samples` has no raw splits to describe)."""
    if not tracker.is_logging_rank or not hasattr(datamodule, "raw_samples"):
        return
    from dlpipe.tracking.datasets import log_datasets

    assert tracker.run_id is not None
    log_datasets(tracker.client, tracker.run_id, datamodule, cfg)


def _log_artifacts(
    cfg: PipelineConfig,
    model: LightningModel,
    datamodule: Any,
    tracker: ExperimentTracker,
    work: Path,
    best: str | None,
    class_names: list[str],
) -> None:
    if best and cfg.tracking.log_checkpoint:
        tracker.log_artifact(best, "checkpoints")
    preprocessor = getattr(datamodule, "preprocessor", None)
    pre_path = work / "preprocessing.json"
    if preprocessor is not None:
        preprocessor.save_config(str(pre_path))
    else:
        pre_path.write_text(cfg.preprocessing.model_dump_json(indent=2))
    tracker.log_artifact(str(pre_path))
    png = save_confusion_matrix_png(
        model.test_confusion.compute(), class_names, work / "confusion_matrix.png"
    )
    tracker.log_artifact(str(png))
    tracker.log_artifact(str(save_model_summary(model, work / "model_summary.txt")))
