"""Checkpoints that can be trusted: checksums, exact resume state, fallback on corruption.

Every checkpoint `X.ckpt` written by `VerifiedModelCheckpoint` gets a sidecar `X.ckpt.sha256`.
`resolve_checkpoint(path)` checks it before a resume; a corrupted file is skipped with a warning
in favour of the newest good checkpoint beside it. `ResumeStateCallback` stores what Lightning
does not: RNG states (torch, CUDA, numpy, python), the sampler position and the learning rates,
so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

CHECKSUM_SUFFIX = ".sha256"


class CheckpointError(RuntimeError):
    """No usable checkpoint: the one asked for is missing or corrupted and none is left."""


class CheckpointCorruptedWarning(UserWarning):
    """A checkpoint failed verification and an older good one is used instead."""


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    return Path(str(path) + CHECKSUM_SUFFIX)


def write_checksum(path: str | Path) -> Path:
    """Write `<path>.sha256` (`<hex>  <file name>`, the sha256sum format)."""
    sidecar = checksum_path(path)
    sidecar.write_text(f"{file_sha256(path)}  {Path(path).name}\n")
    return sidecar


def verify_checkpoint(path: str | Path) -> str | None:
    """Return None when `path` is intact, else why it is not usable."""
    p = Path(path)
    if not p.is_file():
        return f"{p} does not exist"
    sidecar = checksum_path(p)
    if sidecar.is_file():
        expected = sidecar.read_text().split()[0] if sidecar.read_text().strip() else ""
        actual = file_sha256(p)
        if actual != expected:
            return f"{p}: checksum mismatch (expected {expected[:12]}…, got {actual[:12]}…)"
        return None
    # No sidecar (e.g. a checkpoint from elsewhere): at least it must load.
    try:
        torch.load(p, map_location="cpu", weights_only=False)
    except Exception as err:  # any unpickling failure means unusable
        return f"{p}: cannot be read ({type(err).__name__}: {err})"
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint to resume from: `path` if intact, else the newest good one beside it.

    Raises:
        CheckpointError: `path` is unusable and no good checkpoint is in its directory.
    """
    p = Path(path)
    problem = verify_checkpoint(p)
    if problem is None:
        return p
    if not p.parent.is_dir():
        raise CheckpointError(problem)
    candidates = sorted(
        (c for c in p.parent.glob("*.ckpt") if c.resolve() != p.resolve()),
        key=lambda c: c.stat().st_mtime,
        reverse=True,
    )
    for candidate in candidates:
        if verify_checkpoint(candidate) is None:
            warnings.warn(
                f"{problem}; resuming from the previous good checkpoint {candidate}",
                CheckpointCorruptedWarning,
                stacklevel=2,
            )
            return candidate
    raise CheckpointError(f"{problem}; no other good checkpoint in {p.parent}")


def config_from_checkpoint(contents: dict[str, Any]) -> dict[str, Any] | None:
    """The pipeline config (raw dict) stored in a checkpoint by `ResumeStateCallback`."""
    for key, state in contents.get("callbacks", {}).items():
        if key.startswith(ResumeStateCallback.__name__) and isinstance(state, dict):
            config = state.get("config")
            return config if isinstance(config, dict) else None
    return None


def load_verified_checkpoint(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """Resolve (with fallback) and load a checkpoint on the CPU; returns (path used, contents)."""
    used = resolve_checkpoint(path)
    return used, torch.load(used, map_location="cpu", weights_only=False)


class VerifiedModelCheckpoint(ModelCheckpoint):
    """Lightning's top-k + last checkpointing, plus a `.sha256` sidecar for every file.

    `last.ckpt` is rewritten every epoch; Lightning 2.6 only refreshes it when a top-k file
    was written in the same step, which would leave a stale `last` to resume from.
    """

    _last_saved_step = -1

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: Any) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.trainer.states import TrainerFn

        if (
            self.save_last
            and self._last_saved_step != trainer.global_step
            and trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and not getattr(trainer, "fast_dev_run", False)
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and Path(filepath).is_file():
            write_checksum(filepath)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            checksum_path(filepath).unlink(missing_ok=True)


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
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "_trainer", None)
        position: dict[str, int] = {}
        learning_rates: list[float] = []
        if trainer is not None:
            position = {
                "epoch": int(trainer.fit_loop.epoch_progress.current.processed),
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
        self._pending = state_dict.get("rng")
        if self._pending is not None:
            _set_rng_state(self._pending)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The sanity check after a restore draws from the RNG; put the saved state back.
        if self._pending is not None:
            _set_rng_state(self._pending)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_trainer", None)
        return state
