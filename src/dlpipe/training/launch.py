"""Jobs whose processes a launcher starts: torchrun, SLURM's srun, a Kubernetes Job (env://).

Every process runs the same command (`dlpipe train -c CONFIG`); the launcher tells each one who
it is through the environment and they meet at MASTER_ADDR:MASTER_PORT:

| variable | torchrun | srun | Kubernetes Indexed Job (one process per pod) |
| --- | --- | --- | --- |
| rank | RANK | SLURM_PROCID | RANK = node rank x processes per node + LOCAL_RANK |
| node | GROUP_RANK | SLURM_NODEID | NODE_RANK = $JOB_COMPLETION_INDEX |
| process on the node | LOCAL_RANK | SLURM_LOCALID | LOCAL_RANK |
| world | WORLD_SIZE | SLURM_NTASKS | WORLD_SIZE |

Global rank 0 runs `train(cfg)` in full: it opens the MLflow run, logs, tests, packages and
registers exactly one version. Every other rank runs `train_other_rank`: the same fit (same seed,
data and model), then returns without touching MLflow. `SharedRun` hands rank 0's run id and
checkpoint directory to the other ranks once the process group is up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from dlpipe.config import PipelineConfig

if TYPE_CHECKING:
    from dlpipe.training.train import TrainResult


class SharedRun(Callback):
    """Broadcasts rank 0's MLflow run id and checkpoint directory to every rank at setup.

    Every rank builds the same callbacks from the same config, so every rank takes part in the
    broadcast (a collective); afterwards `run_id` and `checkpoint_dir` agree everywhere.
    """

    def __init__(self, run_id: str | None, checkpoint_dir: str) -> None:
        self.run_id = run_id
        self.checkpoint_dir = checkpoint_dir

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.run_id, self.checkpoint_dir = trainer.strategy.broadcast(
            (self.run_id, self.checkpoint_dir), src=0
        )


def train_other_rank(
    cfg: PipelineConfig,
    resume_from: str | None = None,
    *,
    callbacks: list[Callback] | None = None,
    datamodule: pl.LightningDataModule | None = None,
) -> TrainResult:
    """What a rank other than 0 of a launched job runs of `train(cfg)`: the fit alone.

    Returns a `TrainResult` with rank 0's run id and no model version (rank 0 registers).
    """
    from dlpipe.training.checkpoint import load_verified_checkpoint
    from dlpipe.training.devices import check_devices
    from dlpipe.training.train import TrainResult, build_lightning_model
    from dlpipe.training.trainer import DistributedTrainer

    check_devices(cfg.training)
    resume_path = load_verified_checkpoint(resume_from)[0] if resume_from else None
    pl.seed_everything(cfg.training.seed, workers=True, verbose=False)  # the same initial model
    if datamodule is None:
        from dlpipe.data import build_datamodule

        datamodule = build_datamodule(cfg)
    model = build_lightning_model(cfg)
    # This rank writes no checkpoint (rank 0 does); the directory only has to exist.
    checkpoint_dir = resume_path.parent if resume_path else Path(cfg.training.checkpoint_dir)
    runner = DistributedTrainer(cfg, None, callbacks, checkpoint_dir)
    runner.resume_path = resume_path
    outcome = runner.train(model, datamodule)
    shared = runner.shared_run
    return TrainResult(
        run_id=(shared.run_id if shared is not None else None) or "",
        model_name=cfg.tracking.registered_model_name or cfg.training.experiment_name,
        model_version=None,
        metrics={},
        checkpoint=outcome.best_checkpoint or outcome.last_checkpoint,
    )
