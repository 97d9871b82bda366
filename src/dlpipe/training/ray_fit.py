"""Ray Train back end of `DistributedTrainer` (`training.strategy: ray`).

Joins the cluster in `RAY_ADDRESS`, or starts a local one sized for the workers (and stops it
afterwards). Each worker runs the same Lightning recipe with `RayDDPStrategy`,
`RayLightningEnvironment` and `RayTrainReportCallback`; global rank 0 writes the outcome
(best/last checkpoint, final metrics) beside the checkpoints for the driver to read.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl

if TYPE_CHECKING:
    from dlpipe.training.trainer import DistributedTrainer, FitOutcome

OUTCOME_FILE = "ray_outcome.json"


def _train_loop_per_worker(config: dict[str, Any]) -> None:
    """Runs inside every Ray worker."""
    from ray.train.lightning import (
        RayDDPStrategy,
        RayLightningEnvironment,
        RayTrainReportCallback,
        prepare_trainer,
    )

    from dlpipe.training.checkpoint import ChecksummedCheckpointIO
    from dlpipe.training.trainer import fit_outcome

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
    if trainer.is_global_zero:
        outcome = fit_outcome(trainer)
        (runner.checkpoint_dir / OUTCOME_FILE).write_text(json.dumps(outcome.__dict__))


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
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from dlpipe.training.trainer import FitOutcome, TrainingError

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
            run_config=RunConfig(
                # Unique per run: Ray's report callback stages checkpoints in
                # /tmp/lightning_checkpoints-job_id=…-name=<name>-…, and a new local cluster
                # reuses job ids, so two runs on one machine would delete each other's files.
                name=f"dlpipe-{uuid.uuid4().hex[:12]}",
                storage_path=str(runner.checkpoint_dir / "ray_storage"),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        try:
            trainer.fit()
        except Exception as err:
            raise TrainingError(f"Ray training failed; the whole job was stopped: {err}") from err
    finally:
        if started:
            ray.shutdown()
    outcome_file = runner.checkpoint_dir / OUTCOME_FILE
    if not outcome_file.is_file():
        raise TrainingError(f"Ray training ended without an outcome ({outcome_file} missing)")
    outcome = FitOutcome(**json.loads(outcome_file.read_text()))
    weights_from = outcome.best_checkpoint or outcome.last_checkpoint
    if weights_from and Path(weights_from).is_file():
        from dlpipe.training.checkpoint import load_checkpoint_file

        # Exactly the file the outcome names (no fallback), verified, weights only.
        contents = load_checkpoint_file(weights_from, require_checksum=True)
        model.load_state_dict(contents["state_dict"])
    return outcome
