"""`DistributedTrainer`: one Lightning recipe for one process, DDP (N processes) and Ray Train.

    trainer = DistributedTrainer(cfg, tracker=tracker)
    outcome = trainer.train(model, datamodule)     # FitOutcome(best_checkpoint, ...)

`ddp` spawns `training.num_processes` processes (gloo on CPU, NCCL on GPU, one per GPU) through
Lightning's spawn launcher, so it works the same from the CLI, from a notebook and from tests; a
worker that dies ends the whole job at once. `ray` runs Ray Train's TorchTrainer (see `ray_fit.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from dlpipe.config import PipelineConfig
from dlpipe.tracking.experiment import ExperimentTracker
from dlpipe.training.callbacks import MLflowEpochLogger
from dlpipe.training.checkpoint import (
    ChecksummedCheckpointIO,
    LastCheckpoint,
    ResumeStateCallback,
    load_verified_checkpoint,
)

# Bounds a collective that waits on a peer that hangs without dying (a dead peer's closed socket
# is noticed at once); generous because rank 0 may spend a while writing a checkpoint.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=5)


class TrainingError(RuntimeError):
    """Training stopped; the message says why and what to change."""


@dataclass
class FitOutcome:
    """What a finished `fit` leaves behind."""

    best_checkpoint: str | None
    last_checkpoint: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int = 0
    global_step: int = 0


def fit_outcome(trainer: pl.Trainer) -> FitOutcome:
    """The outcome of `trainer.fit`: best/last checkpoint paths from its checkpoint callbacks
    (the first that knows each), the final metrics, the epoch and step reached."""
    best = last = ""
    for callback in trainer.checkpoint_callbacks:
        best = best or getattr(callback, "best_model_path", "")
        last = last or getattr(callback, "last_model_path", "")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return FitOutcome(
        best or None, last or None, metrics, trainer.current_epoch, trainer.global_step
    )


def _allow_locks_in_spawned_workers() -> None:
    """Let spawn pickle objects that hold a threading lock (e.g. a lazily built tokenizer's).

    A spawned worker needs its own fresh lock anyway; this only affects multiprocessing's pickler.
    """
    import threading
    from multiprocessing.reduction import ForkingPickler

    def fresh_lock(lock: Any) -> tuple[Any, tuple[()]]:
        return threading.Lock, ()

    def fresh_rlock(lock: Any) -> tuple[Any, tuple[()]]:
        return threading.RLock, ()

    ForkingPickler.register(type(threading.Lock()), fresh_lock)
    ForkingPickler.register(type(threading.RLock()), fresh_rlock)


def _is_oom(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err)
    return "CUDA out of memory" in text or "OutOfMemoryError" in text


def _worker_death(err: BaseException) -> str | None:
    """A human description when `err` says a DDP/Ray worker process died."""
    from torch.multiprocessing import ProcessExitedException

    if isinstance(err, ProcessExitedException):
        return f"DDP worker process (rank {err.error_index}) died: {err}"
    text = str(err)
    if re.search(r"process \d+ terminated with (signal|exit code)", text):
        return f"a DDP worker process died: {text.strip().splitlines()[-1]}"
    if "ActorDiedError" in type(err).__name__ or ("worker" in text.lower() and "died" in text):
        return f"a Ray worker died: {text.strip().splitlines()[0]}"
    return None


class DistributedTrainer:
    """Train a `LightningModel` with the strategy, precision and checkpoints of `cfg.training`.

    Args:
        cfg: the whole pipeline config (training section drives the trainer).
        tracker: when given, every epoch's metrics go to this run (global rank 0 only).
        callbacks: extra Lightning callbacks (e.g. for tests).
        checkpoint_dir: where checkpoints go; default `cfg.training.checkpoint_dir`.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        tracker: ExperimentTracker | None = None,
        callbacks: list[Callback] | None = None,
        checkpoint_dir: str | Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.extra_callbacks = list(callbacks or [])
        self.checkpoint_dir = Path(checkpoint_dir or cfg.training.checkpoint_dir).absolute()
        self.trainer: pl.Trainer | None = None
        self.resume_path: Path | None = None

    # -- building -------------------------------------------------------------------------------

    def callbacks(self) -> list[Callback]:
        """Checkpointing (top-k + last), exact-resume state, early stopping, tracking."""
        t = self.cfg.training
        out: list[Callback] = [
            # Top-k and `last` are both written at the end of each training epoch; `last` by
            # LastCheckpoint, which Lightning runs after this one (see its docstring).
            ModelCheckpoint(
                dirpath=self.checkpoint_dir,
                filename="epoch{epoch:03d}-step{step:06d}",
                auto_insert_metric_name=False,
                monitor=t.monitor if t.save_top_k > 0 else None,
                mode=t.monitor_mode,
                save_top_k=t.save_top_k,
                save_last=False,
                save_on_train_epoch_end=True,
            ),
            LastCheckpoint(self.checkpoint_dir),
            ResumeStateCallback(self.cfg.model_dump(mode="json")),
        ]
        if t.early_stopping_patience is not None:
            out.append(
                EarlyStopping(
                    monitor=t.monitor, mode=t.monitor_mode, patience=t.early_stopping_patience
                )
            )
        if self.tracker is not None:
            out.append(MLflowEpochLogger(self.tracker))
        return out + self.extra_callbacks

    def _strategy(self) -> tuple[Any, int | str]:
        t = self.cfg.training
        if t.strategy == "ddp":
            _allow_locks_in_spawned_workers()
            devices = t.num_gpus if t.num_gpus > 0 else t.num_processes
            backend = "nccl" if t.num_gpus > 0 else "gloo"
            strategy = DDPStrategy(
                start_method="spawn", process_group_backend=backend, timeout=PROCESS_GROUP_TIMEOUT
            )
            return strategy, devices
        return "auto", 1

    def lightning_trainer(self, **overrides: Any) -> pl.Trainer:
        """A `pl.Trainer` for this config; keyword arguments override any setting."""
        t = self.cfg.training
        strategy, devices = self._strategy()
        kwargs: dict[str, Any] = {
            "accelerator": "gpu" if t.num_gpus > 0 else "cpu",
            "devices": devices,
            "strategy": strategy,
            "precision": t.precision,
            "max_epochs": t.num_epochs,
            "max_steps": t.max_steps,
            "accumulate_grad_batches": t.accumulate_grad_batches,
            "gradient_clip_val": t.gradient_clip_val,
            "deterministic": t.deterministic,
            "callbacks": self.callbacks(),
            "plugins": [ChecksummedCheckpointIO()],
            "logger": False,
            "enable_progress_bar": t.progress_bar,
            "enable_model_summary": t.progress_bar,
            "default_root_dir": str(self.checkpoint_dir),
        }
        if t.limit_train_batches is not None:
            kwargs["limit_train_batches"] = t.limit_train_batches
        if t.limit_val_batches is not None:
            kwargs["limit_val_batches"] = t.limit_val_batches
        kwargs.update(overrides)
        return pl.Trainer(**kwargs)

    # -- running --------------------------------------------------------------------------------

    def train(self, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> FitOutcome:
        """Fit `model` on `datamodule`; resumes from `load_checkpoint`'s path when one was set."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt = str(self.resume_path) if self.resume_path is not None else None
        try:
            if self.cfg.training.strategy == "ray":
                from dlpipe.training.ray_fit import fit_with_ray

                return fit_with_ray(self, model, datamodule, ckpt)
            self.trainer = self.lightning_trainer()
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
        except (KeyboardInterrupt, TrainingError):
            raise
        except BaseException as err:
            raise self._explain(err) from err
        return fit_outcome(self.trainer)

    def _explain(self, err: BaseException) -> BaseException:
        batch = self.cfg.training.batch_size
        if _is_oom(err):
            return TrainingError(
                f"CUDA out of memory with training.batch_size={batch}: try "
                f"-o training.batch_size={max(1, batch // 2)} (and "
                f"training.accumulate_grad_batches={2 * self.cfg.training.accumulate_grad_batches}"
                " to keep the effective batch)"
            )
        death = _worker_death(err)
        if death is not None:
            return TrainingError(f"{death}; the whole job was stopped")
        return err

    def test(
        self, model: pl.LightningModule, datamodule: pl.LightningDataModule
    ) -> dict[str, float]:
        """Evaluate on the test split in this process (one device) and return `test/*` metrics."""
        tester = self.lightning_trainer(
            strategy="auto",
            devices=1,
            callbacks=[],
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        results = tester.test(model, datamodule=datamodule, verbose=False)
        return {k: float(v) for k, v in results[0].items()} if results else {}

    def save_checkpoint(self, path: str | Path) -> Path:
        """Write the current training state (after `train`) to `path`, with its checksum."""
        if self.trainer is None:
            raise TrainingError("nothing to save: call train() first")
        self.trainer.save_checkpoint(str(path))  # through ChecksummedCheckpointIO
        return Path(path)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Verify `path` (falling back to the previous good one) and resume from it next `train`."""
        used, contents = load_verified_checkpoint(path)
        self.resume_path = used
        return contents
