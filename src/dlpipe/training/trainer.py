"""`DistributedTrainer`: one Lightning recipe for one process, DDP, FSDP, DeepSpeed and Ray Train.

    trainer = DistributedTrainer(cfg, tracker=tracker)
    outcome = trainer.train(model, datamodule)     # FitOutcome(best_checkpoint, ...)

`training.num_gpus > 1` (or `num_processes > 1`, or `num_nodes > 1`) always uses every requested
device: DDP unless `training.strategy` names FSDP or DeepSpeed (`devices.process_plan`). dlpipe
spawns the processes itself on one machine (a worker that dies ends the whole job at once);
torchrun, srun or a Kubernetes Job start them for multi-node jobs (`strategies.py`). `ray` runs
Ray Train's TorchTrainer (see `ray_fit.py`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from dlpipe.config import PipelineConfig
from dlpipe.tracking.experiment import ExperimentTracker
from dlpipe.training.callbacks import MLflowEpochLogger
from dlpipe.training.checkpoint import (
    ChecksummedCheckpointIO,
    LastCheckpoint,
    ResumeStateCallback,
    load_verified_checkpoint,
)
from dlpipe.training.devices import (
    ProcessPlan,
    check_devices,
    cuda_device_count,
    process_plan,
)
from dlpipe.training.launch import SharedRun
from dlpipe.training.profiling import build_profiler, log_profiler_reports
from dlpipe.training.strategies import PROCESS_GROUP_TIMEOUT, build_strategy
from dlpipe.training.teardown import finish_distributed_fit

__all__ = ["PROCESS_GROUP_TIMEOUT", "DistributedTrainer", "FitOutcome", "TrainingError"]


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
        tracker: when given, every epoch's metrics go to this run (global rank 0 only), and so
            does the profiler's report.
        callbacks: extra Lightning callbacks (e.g. for tests).
        checkpoint_dir: where checkpoints go; default `cfg.training.checkpoint_dir`.
        device_count: CUDA devices on this node, checked when `train` starts; default what
            torch sees. `trainer_kwargs` never looks at the machine, so a 4-GPU plan can be
            inspected anywhere.
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        tracker: ExperimentTracker | None = None,
        callbacks: list[Callback] | None = None,
        checkpoint_dir: str | Path | None = None,
        device_count: Callable[[], int] = cuda_device_count,
    ) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.extra_callbacks = list(callbacks or [])
        self.checkpoint_dir = Path(checkpoint_dir or cfg.training.checkpoint_dir).absolute()
        self.device_count = device_count
        self.trainer: pl.Trainer | None = None
        self.resume_path: Path | None = None
        self.shared_run: SharedRun | None = None

    @property
    def plan(self) -> ProcessPlan:
        """Processes per node, nodes, strategy, and whether a launcher started them."""
        return process_plan(self.cfg.training)

    @property
    def profiler_dir(self) -> Path:
        return self.checkpoint_dir / "profiler"

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
        if self.plan.world_size > 1 and t.strategy != "ray":
            run_id = self.tracker.run_id if self.tracker is not None else None
            self.shared_run = SharedRun(run_id, str(self.checkpoint_dir))
            out.append(self.shared_run)
        return out + self.extra_callbacks

    def trainer_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """What `pl.Trainer` receives for this config (keyword arguments override any setting):
        the accelerator, every requested device on every node, the strategy object, precision,
        accumulation, callbacks, the checkpoint plugin and the profiler."""
        t = self.cfg.training
        plan = self.plan
        kwargs: dict[str, Any] = {
            "accelerator": plan.accelerator,
            "devices": plan.devices,
            "num_nodes": plan.num_nodes,
            "precision": t.precision,
            "max_epochs": t.num_epochs,
            "max_steps": t.max_steps,
            "accumulate_grad_batches": t.accumulate_grad_batches,
            "gradient_clip_val": t.gradient_clip_val,
            "deterministic": t.deterministic,
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
        # Built only when not overridden: a strategy or callbacks are not free to construct.
        if "strategy" not in overrides:
            kwargs["strategy"] = build_strategy(plan, t)
        if "callbacks" not in overrides:
            kwargs["callbacks"] = self.callbacks()
        if "profiler" not in overrides:
            kwargs["profiler"] = build_profiler(t.profiler, self.profiler_dir)
        kwargs.update(overrides)
        return kwargs

    def lightning_trainer(self, **overrides: Any) -> pl.Trainer:
        """A `pl.Trainer` for this config; keyword arguments override any setting."""
        return pl.Trainer(**self.trainer_kwargs(**overrides))

    # -- running --------------------------------------------------------------------------------

    def train(self, model: pl.LightningModule, datamodule: pl.LightningDataModule) -> FitOutcome:
        """Fit `model` on `datamodule`; resumes from `load_checkpoint`'s path when one was set.

        Afterwards `model` holds the final weights in this process (whole tensors, also after
        FSDP), and only this process is left in any process group the fit joined, so testing
        and packaging run on rank 0 alone.
        """
        check_devices(self.cfg.training, self.device_count)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt = str(self.resume_path) if self.resume_path is not None else None
        try:
            if self.cfg.training.strategy == "ray":
                from dlpipe.training.ray_fit import fit_with_ray

                outcome = fit_with_ray(self, model, datamodule, ckpt)
            else:
                self.trainer = self.lightning_trainer()
                self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt)
                outcome = finish_distributed_fit(self.trainer, model, fit_outcome(self.trainer))
        except (KeyboardInterrupt, TrainingError):
            raise
        except BaseException as err:
            raise self._explain(err) from err
        if self.tracker is not None and self.tracker.is_logging_rank:
            log_profiler_reports(self.tracker, self.profiler_dir)
        return outcome

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
            num_nodes=1,
            profiler=None,
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
