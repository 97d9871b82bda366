"""Checkpoints that can be trusted: checksums, exact resume state, fallback on corruption.

Files are written and read by `ChecksummedCheckpointIO` (see `checkpoint_io.py`): every
`X.ckpt` gets a sidecar `X.ckpt.sha256`, and loading is always weights-only. `LastCheckpoint`
refreshes `last.ckpt` every epoch. `resolve_checkpoint(path)` checks the sidecar before a resume;
a corrupted file is skipped with a warning in favour of the newest *verified* checkpoint beside it.
`ResumeStateCallback` stores what Lightning does not: RNG states (torch, CUDA, numpy, python), the
sampler position and the learning rates, so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from dlpipe.training.checkpoint_io import (
    CheckpointError,
    ChecksummedCheckpointIO,
    Integrity,
    check_checkpoint,
    load_checkpoint_file,
    verify_checkpoint,
    write_checksum,
)
from dlpipe.training.checksums import CHECKSUM_SUFFIX, checksum_path, file_sha256

__all__ = [
    "CHECKSUM_SUFFIX",
    "CheckpointCorruptedWarning",
    "CheckpointError",
    "ChecksummedCheckpointIO",
    "LastCheckpoint",
    "ResumeStateCallback",
    "UnverifiedCheckpointWarning",
    "check_checkpoint",
    "checksum_path",
    "config_from_checkpoint",
    "file_sha256",
    "load_checkpoint_file",
    "load_verified_checkpoint",
    "resolve_checkpoint",
    "verify_checkpoint",
    "write_checksum",
]


class CheckpointCorruptedWarning(UserWarning):
    """A checkpoint failed verification and an older verified one is used instead."""


class UnverifiedCheckpointWarning(UserWarning):
    """The checkpoint asked for has no checksum; it is used, loaded as weights only."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: `path` unless missing or corrupt, else the newest verified
    checkpoint beside it.

    `path` without a sidecar is used as given (it was named explicitly; it will be loaded
    weights-only). The fallback only takes files whose sidecar matches: nothing else in the
    directory is ever opened as a checkpoint.

    Raises:
        CheckpointError: `path` is unusable and no verified checkpoint is in its directory.
    """
    p = Path(path)
    integrity, why = check_checkpoint(p)
    if integrity is Integrity.VERIFIED:
        return p
    if integrity is Integrity.UNVERIFIED:
        warnings.warn(
            f"{why}; using it as named, loaded as weights only",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
        return p
    if not p.parent.is_dir():
        raise CheckpointError(why)
    candidates = sorted(
        (c for c in p.parent.glob("*.ckpt") if c.resolve() != p.resolve()),
        key=lambda c: c.stat().st_mtime,
        reverse=True,
    )
    for candidate in candidates:
        if check_checkpoint(candidate)[0] is Integrity.VERIFIED:
            warnings.warn(
                f"{why}; resuming from the previous good checkpoint {candidate}",
                CheckpointCorruptedWarning,
                stacklevel=2,
            )
            return candidate
    raise CheckpointError(f"{why}; no other good checkpoint (checksum verified) in {p.parent}")


def config_from_checkpoint(contents: dict[str, Any]) -> dict[str, Any] | None:
    """The pipeline config (raw dict) stored in a checkpoint by `ResumeStateCallback`."""
    for key, state in contents.get("callbacks", {}).items():
        if key.startswith(ResumeStateCallback.__name__) and isinstance(state, dict):
            config = state.get("config")
            return config if isinstance(config, dict) else None
    return None


def load_verified_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Resolve (with fallback) and load a checkpoint weights-only on the CPU; returns
    (path used, contents).

    Raises:
        CheckpointError: nothing usable, or the file needs more than plain data to load.
    """
    used = resolve_checkpoint(path)
    return used, load_checkpoint_file(used)


class LastCheckpoint(Checkpoint):
    """Writes `dirpath/last.ckpt` at the end of every training epoch (and when training ends).

    `ModelCheckpoint(save_last=True)` in Lightning 2.6.6 refreshes `last` at an epoch end only
    when it wrote a top-k file in the same step (`_last_global_step_saved == global_step`), so an
    epoch outside the top k, or `save_top_k=0`, would leave a stale `last.ckpt` to resume from.
    As a `Checkpoint`, Lightning runs this hook after every other callback's and after a
    `ModelCheckpoint` listed before it: the file holds their state for this epoch.

    Args:
        dirpath: directory of `last.ckpt`.
    """

    FILE_NAME = "last.ckpt"

    def __init__(self, dirpath: str | Path) -> None:
        self.dirpath = Path(dirpath)
        self.last_model_path = ""
        self.saved_step: int | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.saved_step = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Also when no epoch ran (a resume of a finished run), as ModelCheckpoint does for `last`.
        if self.saved_step != trainer.global_step:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write `last.ckpt` now (every rank calls this; the strategy writes on rank 0)."""
        fast_dev_run = getattr(trainer, "fast_dev_run", False)  # set by Trainer, not annotated
        if trainer.sanity_checking or fast_dev_run or trainer.state.fn != TrainerFn.FITTING:
            return
        path = self.dirpath / self.FILE_NAME
        trainer.save_checkpoint(path)
        self.saved_step = trainer.global_step
        self.last_model_path = str(path)


def _rng_state() -> dict[str, Any]:
    np_state: tuple[Any, ...] = tuple(np.random.get_state(legacy=True))
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


class ResumeStateCallback(Callback):
    """Saves RNG states, sampler position, learning rates and the run's config; restores the RNG
    states on resume.

    Args:
        config: the pipeline config as a JSON-safe dict (lets `--resume` work without `-c`).
    """

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.config = config
        self.pending_rng: dict[str, Any] | None = None
        self.trainer: pl.Trainer | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = self.trainer
        position: dict[str, int] = {}
        learning_rates: list[float] = []
        if trainer is not None:
            epochs: Any = trainer.fit_loop.epoch_progress.current  # a processed-tracker
            position = {
                "epoch": int(epochs.processed),
                "batches_seen_in_epoch": int(
                    trainer.fit_loop.epoch_loop.batch_progress.current.ready
                ),
                "global_step": int(trainer.global_step),
            }
            learning_rates = [
                float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups
            ]
        return {
            "rng": _rng_state(),
            "sampler": position,
            "learning_rates": learning_rates,
            "config": self.config,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.pending_rng = state_dict.get("rng")
        if self.pending_rng is not None:
            _set_rng_state(self.pending_rng)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sanity check after a restore draws from the RNG; put the saved state back.
        if self.pending_rng is not None:
            _set_rng_state(self.pending_rng)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.pending_rng = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["trainer"] = None  # spawn/Ray pickle callbacks; the trainer is set again in setup
        return state
