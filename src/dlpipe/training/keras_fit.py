"""`train_keras(cfg)`: `model.framework: tensorflow` through the same run, package and registry.

    from dlpipe.training.keras_fit import train_keras
    result = train_keras(load_config("configs/fashion_mnist_keras.yaml"))
    result.metrics["test/acc"], result.model_version

This process (which may have torch loaded) never imports TensorFlow. It loads the splits through
the usual DataModule, writes them as raw uint8 images / texts to an `.npz`, and starts
`training.num_processes` TensorFlow workers (`python -m dlpipe.training.keras_worker`; several
form a `MultiWorkerMirroredStrategy` on localhost ports). While they train it logs each epoch's
`train/*` and `val/*` metrics to MLflow as the chief reports them; then the test metrics,
`data/skipped_samples`, the checkpoint, preprocessing.json, confusion_matrix.png and
model_summary.txt, exactly the keys of the PyTorch path. The tested model is packaged
(config.yaml, preprocessing.json, metadata.json, model.keras [, tokenizer.json]) and registered
with framework `tensorflow`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.config import PipelineConfig
from dlpipe.models.keras import KERAS_FILE
from dlpipe.tracking.experiment import ExperimentTracker
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.package import PREPROCESSING_FILE, save_model_package
from dlpipe.training.keras_checkpoint import read_state, resolve_keras_checkpoint
from dlpipe.training.keras_worker import (
    DATA_FILE,
    JOB_FILE,
    METRICS_FILE,
    MODEL_FILE,
    RESULT_FILE,
    SUMMARY_FILE,
)
from dlpipe.training.train import PLAN_FIELDS, TrainResult, register_package
from dlpipe.training.trainer import TrainingError

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
WORKER_MODULE = "dlpipe.training.keras_worker"


def train_keras(
    cfg: PipelineConfig,
    resume_from: str | None = None,
    *,
    datamodule: Any = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    stop_after_epochs: int | None = None,
) -> TrainResult:
    """Train, test, package and register a Keras model as `cfg` describes.

    Args:
        resume_from: a `last.keras` / `best.keras` checkpoint of an earlier run (verified; a
            corrupted one falls back to the newest good checkpoint beside it, with a warning).
        datamodule: use this instead of `dlpipe.data.build_datamodule(cfg)`.
        on_epoch: called with (epoch, metrics) as each epoch's metrics arrive.
        stop_after_epochs: end this job once that many epochs are done (counting those of the
            resumed run), keeping the plan of `training.num_epochs`: a later resume from
            `last.keras` continues as if never stopped (an interrupted job, on purpose).
    """
    if cfg.model.framework != "tensorflow":
        raise ValueError(
            f"train_keras needs model.framework: tensorflow, got {cfg.model.framework!r}"
        )
    if cfg.model.weights_path:  # refused rather than silently ignored
        raise ValueError("model.weights_path is not supported for Keras models; use resume_from")
    resume_path = resolve_keras_checkpoint(resume_from) if resume_from else None
    if resume_path is not None:
        check_keras_resume_plan(cfg, resume_path)
    if datamodule is None:
        from dlpipe.data import build_datamodule

        datamodule = build_datamodule(cfg)
    datamodule.setup()
    tracker = ExperimentTracker(cfg.tracking.tracking_uri, cfg.training.experiment_name)
    tracker.start_run(cfg.name, cfg.flat_params())
    tags = {"dlpipe.framework": "tensorflow"}
    if resume_path is not None:
        tags["dlpipe.resumed_from"] = str(resume_path)
    tracker.set_tags(tags)
    try:
        result = _train_tracked(cfg, datamodule, tracker, resume_path, on_epoch, stop_after_epochs)
    except BaseException:
        tracker.end_run("FAILED")
        raise
    tracker.end_run()
    return result


def check_keras_resume_plan(cfg: PipelineConfig, checkpoint: Path) -> None:
    """Refuse a resume whose schedule-defining settings differ from the checkpoint's run."""
    before = read_state(checkpoint).get("config", {}).get("training", {})
    changed = [
        f"training.{key}={before.get(key)!r} -> {getattr(cfg.training, key)!r}"
        for key in PLAN_FIELDS
        if key in before and before[key] != getattr(cfg.training, key)
    ]
    if changed:
        raise TrainingError(
            f"cannot resume {checkpoint} with a different training plan ({'; '.join(changed)}); "
            "keep these settings, or start a new run"
        )


def config_from_keras_checkpoint(path: str | Path) -> PipelineConfig:
    """The config a Keras checkpoint was trained with (`dlpipe train --resume X.keras`)."""
    from dlpipe.config import config_from_dict

    return config_from_dict(read_state(resolve_keras_checkpoint(path))["config"])


def write_splits(datamodule: Any, path: Path) -> None:
    """Raw samples of every split as arrays: uint8 N×H×W×C images (or texts) and int64 labels."""
    arrays: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        pairs = datamodule.raw_samples(split)
        samples = [sample for sample, _ in pairs]
        if samples and isinstance(samples[0], str):
            arrays[f"{split}_x"] = np.array(samples, dtype=np.str_)
        elif samples:
            arrays[f"{split}_x"] = np.stack(samples).astype(np.uint8, copy=False)
        else:
            arrays[f"{split}_x"] = np.zeros((0,), dtype=np.uint8)
        arrays[f"{split}_y"] = np.array([int(label) for _, label in pairs], dtype=np.int64)
    np.savez(path, allow_pickle=False, **arrays)  # uncompressed: written and read once, locally


def free_ports(count: int) -> list[int]:
    """Ports the OS had free just now (for the workers' gRPC servers)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("localhost", 0))
        return [int(s.getsockname()[1]) for s in sockets]


def run_workers(
    job_dir: Path,
    world: int,
    on_record: Callable[[dict[str, Any]], None],
) -> dict[str, Any]:
    """Start `world` TensorFlow workers on `job_dir`, relay per-epoch records, return result.json.

    Raises:
        TrainingError: a worker failed (the message carries the end of its log).
    """
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logs = [job_dir / f"worker-{rank}.log" for rank in range(world)]
    procs: list[subprocess.Popen[bytes]] = []
    metrics, seen = job_dir / METRICS_FILE, 0
    try:
        for rank, log_path in enumerate(logs):
            with open(log_path, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", WORKER_MODULE, str(job_dir), str(rank)],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        env=env,
                    )
                )
        while True:
            seen = _relay(metrics, seen, on_record)
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank = failed[0]
                tail = logs[rank].read_text(errors="replace").strip().splitlines()[-25:]
                raise TrainingError(
                    f"TensorFlow worker {rank} exited with status {codes[rank]}:\n  "
                    + "\n  ".join(tail)
                )
            if all(c == 0 for c in codes):
                _relay(metrics, seen, on_record)
                break
            time.sleep(POLL_SECONDS)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    result: dict[str, Any] = json.loads((job_dir / RESULT_FILE).read_text())
    return result


def _relay(path: Path, seen: int, on_record: Callable[[dict[str, Any]], None]) -> int:
    """Hand over complete lines of `path` beyond the first `seen`; returns the new count."""
    if not path.is_file():
        return seen
    lines = path.read_text().split("\n")[:-1]  # the last piece may be a line being written
    for line in lines[seen:]:
        on_record(json.loads(line))
    return max(seen, len(lines))


def _train_tracked(
    cfg: PipelineConfig,
    datamodule: Any,
    tracker: ExperimentTracker,
    resume_path: Path | None,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
    stop_after_epochs: int | None,
) -> TrainResult:
    run_id = tracker.run_id
    assert run_id is not None
    run_dir = resume_path.parent if resume_path else Path(cfg.training.checkpoint_dir) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    world = cfg.training.num_processes

    def on_record(record: dict[str, Any]) -> None:
        epoch = int(record.pop("epoch"))
        values = {k: float(v) for k, v in record.items()}
        tracker.log_metrics(values, step=epoch)
        log.info("epoch %d: %s", epoch, ", ".join(f"{k}={v:.4f}" for k, v in values.items()))
        if on_epoch is not None:
            on_epoch(epoch, values)

    with tempfile.TemporaryDirectory(prefix="dlpipe-keras-") as tmp:
        job_dir = Path(tmp)
        write_splits(datamodule, job_dir / DATA_FILE)
        job = {
            "config": cfg.model_dump(mode="json"),
            "world": world,
            "ports": free_ports(world) if world > 1 else [],
            "checkpoint_dir": str(run_dir.resolve()),
            "resume": str(resume_path.resolve()) if resume_path else None,
            "stop_after_epochs": stop_after_epochs,
        }
        (job_dir / JOB_FILE).write_text(json.dumps(job))
        if tracker.is_logging_rank and hasattr(datamodule, "raw_samples"):
            from dlpipe.tracking.datasets import log_datasets

            log_datasets(tracker.client, run_id, datamodule, cfg)  # as the PyTorch path does
        outcome = run_workers(job_dir, world, on_record)
        test_metrics = {k: float(v) for k, v in outcome["test"].items()}
        skipped = float(getattr(datamodule, "skipped_samples", 0))
        tracker.log_metrics({**test_metrics, "data/skipped_samples": skipped}, outcome["epochs"])
        class_names = list(getattr(datamodule, "class_names", []) or [])
        tested = outcome["tested_checkpoint"]
        _log_artifacts(cfg, datamodule, tracker, job_dir, tested, outcome, class_names)
        model_name = cfg.tracking.registered_model_name or cfg.training.experiment_name
        preprocessing, package_cfg = cfg.preprocessing, cfg
        if class_names and not preprocessing.class_names:
            preprocessing = preprocessing.model_copy(update={"class_names": class_names})
            # The package's own config too: servers label with its names.
            package_cfg = cfg.model_copy(update={"preprocessing": preprocessing})
        metadata = ModelMetadata(
            model_name=model_name,
            framework="tensorflow",
            precision="fp32",  # mixed precision computes in bf16 but keeps float32 weights
            model_size_mb=0.0,  # filled from model.keras by save_model_package
            training_date=utc_now(),
            accuracy_metrics=test_metrics,
            preprocessing_config=preprocessing,
            source_run_id=run_id,
            format_details={
                "strategy": "multi_worker_mirrored" if world > 1 else "single_process",
                "num_processes": world,
                "epochs": outcome["epochs"],
                "model_file": KERAS_FILE,
                "training_precision": cfg.training.precision,
            },
        )
        package_dir = Path(cfg.training.checkpoint_dir) / run_id / "model"
        save_keras_package(package_dir, package_cfg, metadata, job_dir / MODEL_FILE, datamodule)
        version = None
        if cfg.tracking.register_model:
            version = register_package(tracker, package_dir, metadata)
    return TrainResult(
        run_id=run_id,
        model_name=model_name,
        model_version=version,
        metrics=test_metrics,
        checkpoint=tested,
        package_dir=str(package_dir),
    )


def save_keras_package(
    directory: Path,
    cfg: PipelineConfig,
    metadata: ModelMetadata,
    keras_file: Path,
    datamodule: Any = None,
) -> Path:
    """A model package with `model.keras` in place of weights.pt (see docs/architecture.md)."""
    pre = getattr(datamodule, "preprocessor", None)
    tokenizer = getattr(pre, "tokenizer_file", None)  # the tokenizer the splits were encoded with
    return save_model_package(
        directory, cfg, metadata, keras_path=keras_file, tokenizer_file=tokenizer
    )


def _log_artifacts(
    cfg: PipelineConfig,
    datamodule: Any,
    tracker: ExperimentTracker,
    job_dir: Path,
    checkpoint: str | None,
    outcome: dict[str, Any],
    class_names: list[str],
) -> None:
    from dlpipe.training.artifacts import save_confusion_matrix_png

    if checkpoint and cfg.tracking.log_checkpoint:
        tracker.log_artifact(checkpoint, "checkpoints")
    pre_path = job_dir / PREPROCESSING_FILE
    preprocessor = getattr(datamodule, "preprocessor", None)
    if preprocessor is not None:
        preprocessor.save_config(str(pre_path))
    else:
        pre_path.write_text(cfg.preprocessing.model_dump_json(indent=2))
    tracker.log_artifact(str(pre_path))
    png = save_confusion_matrix_png(
        np.asarray(outcome["confusion"]), class_names, job_dir / "confusion_matrix.png"
    )
    tracker.log_artifact(str(png))
    tracker.log_artifact(str(job_dir / SUMMARY_FILE))
