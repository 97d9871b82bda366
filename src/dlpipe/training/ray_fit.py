"""Ray Train back end of `DistributedTrainer` (`training.strategy: ray`).

Joins the cluster in `RAY_ADDRESS`, or starts a local one sized for the workers (and stops it
afterwards). Each worker runs the same Lightning recipe with `RayDDPStrategy`,
`RayLightningEnvironment` and `RayTrainReportCallback`.

Where the results go: every epoch's checkpoint and, when the fit ends, global rank 0's outcome
(best/last checkpoint names, final metrics) with the best checkpoint and its checksum are
reported to Ray's storage (`training.storage_path`); the driver reads them back from there.
Workers' own disks are never read by the driver, so on a cluster of several machines the driver
gets the model wherever rank 0 ran, as long as `storage_path` is storage every node and the
driver reach: an NFS mount, or a URI pyarrow's filesystems read (`s3://bucket/prefix`,
`gs://...`). Unset, it is a directory under the run's checkpoint directory (one machine only).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

from dlpipe.training.checkpoint import checksum_path

if TYPE_CHECKING:
    from ray.train import RunConfig

    from dlpipe.training.trainer import DistributedTrainer, FitOutcome

OUTCOME_FILE = "ray_outcome.json"
# Ray storage keeps this many reported checkpoints (the last is always the final outcome).
CHECKPOINTS_KEPT = 2


def storage_location(runner: DistributedTrainer) -> str:
    """Ray's storage for this run: `training.storage_path` as given when it is a URI
    (`s3://...`, read through pyarrow's filesystems), an absolute path otherwise; by default a
    directory beside the run's checkpoints (good for one machine only)."""
    given = runner.cfg.training.storage_path
    if given is None:
        return str(runner.checkpoint_dir / "ray_storage")
    if "://" in given:
        return given
    return str(Path(given).expanduser().absolute())


def run_config(runner: DistributedTrainer) -> RunConfig:
    """Ray's RunConfig for `runner`: a unique run name, the storage location, no retries."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(
        # Unique per run: Ray's report callback stages checkpoints in
        # /tmp/lightning_checkpoints-job_id=…-name=<name>-…, and a new local cluster reuses
        # job ids, so two runs on one machine would delete each other's files.
        name=f"dlpipe-{uuid.uuid4().hex[:12]}",
        storage_path=storage_location(runner),
        checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        failure_config=FailureConfig(max_failures=0),
    )


def _report_outcome(trainer: pl.Trainer) -> None:
    """Every worker reports once more (Ray expects as many reports from each); rank 0's report
    carries the outcome and the checkpoint file the driver loads, with its checksum."""
    import ray.train
    from ray.train import Checkpoint

    from dlpipe.training.trainer import fit_outcome

    if not trainer.is_global_zero:
        ray.train.report({"dlpipe/outcome": 0.0})
        return
    outcome = fit_outcome(trainer)
    with tempfile.TemporaryDirectory(prefix="dlpipe-ray-outcome-") as staging:
        folder = Path(staging)
        (folder / OUTCOME_FILE).write_text(json.dumps(outcome.__dict__))
        weights = outcome.best_checkpoint or outcome.last_checkpoint
        if weights:
            for source in (Path(weights), checksum_path(weights)):
                shutil.copy2(source, folder / source.name)
        ray.train.report({"dlpipe/outcome": 1.0}, checkpoint=Checkpoint.from_directory(staging))


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs inside every Ray worker."""
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    from dlpipe.training.checkpoint import ChecksummedCheckpointIO

    runner: DistributedTrainer = config["runner"]
    callbacks = [*runner.callbacks(), RayTrainReportCallback()]
    backend = "nccl" if runner.cfg.training.num_gpus > 0 else "gloo"
    # RayDDPStrategy is a DDPStrategy built without a checkpoint_io, so the Trainer hands it the
    # CheckpointIO from `plugins` (Lightning refuses only when both set one).
    trainer = runner.lightning_trainer(
        strategy=RayDDPStrategy(process_group_backend=backend),
        plugins=[RayLightningEnvironment(), ChecksummedCheckpointIO()],
        devices="auto",
        callbacks=callbacks,
    )
    trainer = prepare_trainer(trainer)
    if not isinstance(trainer.strategy.checkpoint_io, ChecksummedCheckpointIO):
        raise RuntimeError(f"Ray strategy ignored the checkpoint plugin: {trainer.strategy}")
    trainer.fit(config["model"], datamodule=config["datamodule"], ckpt_path=config["ckpt_path"])
    _report_outcome(trainer)


def _ensure_ray(num_workers: int) -> bool:
    """Connect to Ray; return True when this call started a local cluster."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        return False
    ray.init(num_cpus=max(2, num_workers), include_dashboard=False, log_to_driver=False)
    return True


def fit_with_ray(
    runner: DistributedTrainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str | None,
) -> FitOutcome:
    """Train on `training.num_processes` Ray workers and load the final weights into `model`."""
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from dlpipe.training.trainer import TrainingError

    t = runner.cfg.training
    started = _ensure_ray(t.num_processes)
    try:
        trainer = TorchTrainer(
            _train_loop_per_worker,
            train_loop_config={
                "runner": runner,
                "model": model,
                "datamodule": datamodule,
                "ckpt_path": ckpt_path,
            },
            scaling_config=ScalingConfig(
                num_workers=t.num_processes,
                use_gpu=t.num_gpus > 0,
                resources_per_worker={"CPU": 1, **({"GPU": 1} if t.num_gpus > 0 else {})},
            ),
            run_config=run_config(runner),
        )
        try:
            result = trainer.fit()
        except Exception as err:
            raise TrainingError(f"Ray training failed; the whole job was stopped: {err}") from err
        if result.checkpoint is None:
            raise TrainingError("Ray training ended without reporting its outcome to storage")
        with result.checkpoint.as_directory() as reported:
            outcome = _outcome_from_storage(Path(reported), runner.checkpoint_dir)
    finally:
        if started:
            ray.shutdown()
    weights_from = outcome.best_checkpoint or outcome.last_checkpoint
    if weights_from:
        from dlpipe.training.checkpoint import load_checkpoint_file

        # Exactly the file the outcome names (no fallback), verified, weights only.
        contents = load_checkpoint_file(weights_from, require_checksum=True)
        model.load_state_dict(contents["state_dict"])
    return outcome


def _outcome_from_storage(reported: Path, checkpoint_dir: Path) -> FitOutcome:
    """The outcome rank 0 reported, with its checkpoint copied into this machine's
    `checkpoint_dir` (where rank 0 wrote it too, when it ran here: the same bytes)."""
    from dlpipe.training.trainer import FitOutcome, TrainingError

    outcome_file = reported / OUTCOME_FILE
    if not outcome_file.is_file():
        raise TrainingError(f"Ray training reported no outcome ({outcome_file} missing)")
    outcome = FitOutcome(**json.loads(outcome_file.read_text()))
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    local: dict[str, str] = {}
    for name in (outcome.best_checkpoint, outcome.last_checkpoint):
        if name and (reported / Path(name).name).is_file():
            target = checkpoint_dir / Path(name).name
            for source in (reported / target.name, reported / checksum_path(target).name):
                staged = target.parent / f".{source.name}.{uuid.uuid4().hex[:8]}.tmp"
                shutil.copyfile(source, staged)
                os.replace(staged, target.parent / source.name)
            local[name] = str(target)
    best = local.get(outcome.best_checkpoint or "", outcome.best_checkpoint)
    last = local.get(outcome.last_checkpoint or "", outcome.last_checkpoint)
    return FitOutcome(best, last, outcome.metrics, outcome.epochs, outcome.global_step)
