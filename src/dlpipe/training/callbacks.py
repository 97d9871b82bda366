"""Lightning callbacks that connect training to experiment tracking."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from dlpipe.tracking.experiment import ExperimentTracker

EPOCH_METRIC_PREFIXES = ("train/", "val/")


def epoch_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The epoch-level train/val metrics Lightning holds right now, plus the learning rate."""
    out: dict[str, float] = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith(EPOCH_METRIC_PREFIXES):
            out[key] = float(value)
    if trainer.optimizers:
        out["train/lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
    return out


class MLflowEpochLogger(Callback):
    """Logs every epoch's train and validation metrics to the tracker (global rank 0 only).

    The MLflow step is the epoch number, so each epoch has exactly one value per metric.
    """

    def __init__(self, tracker: ExperimentTracker, extra: dict[str, float] | None = None) -> None:
        self.tracker = tracker
        self.extra = dict(extra or {})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = epoch_metrics(trainer)
        metrics.update(self.extra)
        self.tracker.log_metrics(metrics, step=trainer.current_epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.tracker.run_id}
