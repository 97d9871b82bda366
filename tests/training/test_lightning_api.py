"""Training uses Lightning only through public extension points, and they do what we need."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import dlpipe
from dlpipe.training.checkpoint import (
    ChecksummedCheckpointIO,
    LastCheckpoint,
    ResumeStateCallback,
    verify_checkpoint,
)
from dlpipe.training.module import LightningModel
from dlpipe.training.trainer import DistributedTrainer, fit_outcome

# Set by ABCMeta on every subclass of an ABC (e.g. CheckpointIO), not written by us.
METACLASS_NAMES = {"_abc_impl"}


def is_lightning(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("lightning", "pytorch_lightning")


def private_names(cls: type) -> list[str]:
    """Single-underscore names the class itself defines (dunders excluded)."""
    return [
        name
        for name in vars(cls)
        if name.startswith("_")
        and not (name.startswith("__") and name.endswith("__"))
        and name not in METACLASS_NAMES
    ]


def private_overrides(cls: type) -> list[str]:
    """Private names of `cls` that replace something a Lightning base class has."""
    bases = [b for b in cls.__mro__[1:] if is_lightning(b)]
    return [name for name in private_names(cls) if any(hasattr(b, name) for b in bases)]


def _imports(path: Path, module: str) -> set[str]:
    """Every module name `path` imports, anywhere in the file (lazy imports included)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = importlib.util.resolve_name("." * node.level + base, package)
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names)
    return out


def modules_that_can_reach_lightning() -> set[str]:
    """dlpipe modules importing Lightning, directly or through other dlpipe modules.

    Only these can define a Lightning subclass; importing just them keeps this test away from
    modules that must not share a process with torch (e.g. a TensorFlow worker).
    """
    root = Path(dlpipe.__file__).parent
    imports = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        name = ".".join(parts)
        imports[name] = _imports(path, name)
    reach: set[str] = set()
    grew = True
    while grew:
        grew = False
        for name, deps in imports.items():
            if name not in reach and any(
                d.split(".")[0] in ("lightning", "pytorch_lightning") or d in reach for d in deps
            ):
                reach.add(name)
                grew = True
    return reach


def dlpipe_lightning_subclasses() -> list[type]:
    found = []
    for name in sorted(modules_that_can_reach_lightning()):
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and obj.__module__ == name
                and any(is_lightning(b) for b in obj.__mro__[1:])
            ):
                found.append(obj)
    return found


def test_the_checks_see_a_private_override() -> None:
    class Sneaky(ModelCheckpoint):
        def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None: ...

    class OwnHelper(Callback):
        def _helper(self) -> None: ...

    assert private_overrides(Sneaky) == ["_save_checkpoint"]
    assert private_overrides(OwnHelper) == [] and private_names(OwnHelper) == ["_helper"]


def test_no_dlpipe_class_overrides_a_private_lightning_name() -> None:
    classes = dlpipe_lightning_subclasses()
    names = {cls.__name__ for cls in classes}
    assert {
        "LightningModel",
        "LastCheckpoint",
        "ResumeStateCallback",
        "MLflowEpochLogger",
        "ChecksummedCheckpointIO",
        "ClassifierDataModule",
    } <= names, names
    assert {cls.__name__: private_overrides(cls) for cls in classes if private_overrides(cls)} == {}
    # Training's own subclasses keep no private names at all: nothing that could start to
    # shadow a Lightning internal in a later release.
    training = [c for c in classes if c.__module__.startswith("dlpipe.training")]
    assert {c.__name__: private_names(c) for c in training if private_names(c)} == {}


class EpochScore(LightningModel):
    """Logs `val/epoch` (= the epoch number): with mode=min only epoch 0 is ever a top-k file."""

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        self.log("val/epoch", float(self.current_epoch), batch_size=batch[1].shape[0])
        return super().validation_step(batch, batch_idx)


class LastSeenAtEpochStart(Callback):
    """Records the epoch stored in `last.ckpt` when each later epoch starts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[tuple[int, int]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch > 0:
            stored = torch.load(self.path, weights_only=True)["epoch"]
            self.seen.append((trainer.current_epoch, stored))


def _epoch_score_model() -> EpochScore:
    torch.manual_seed(0)
    return EpochScore(torch.nn.Linear(3, 2), num_classes=2, scheduler="none")


@pytest.mark.parametrize("top_k", [0, 1])
def test_last_checkpoint_is_refreshed_every_epoch(
    tiny: SimpleNamespace, tmp_path: Path, top_k: int
) -> None:
    cfg = tiny.config(
        tmp_path,
        "training.num_epochs=4",
        f"training.save_top_k={top_k}",
        "training.monitor=val/epoch",
        "training.monitor_mode=min",
    )
    watch = LastSeenAtEpochStart(tmp_path / "run" / "last.ckpt")
    runner = DistributedTrainer(cfg, callbacks=[watch], checkpoint_dir=tmp_path / "run")
    outcome = runner.train(_epoch_score_model(), tiny.datamodule(0, 8, 3, 2, 4))

    assert watch.seen == [(1, 0), (2, 1), (3, 2)]
    files = sorted(p.name for p in (tmp_path / "run").glob("*.ckpt"))
    assert files == (["epoch000-step000002.ckpt"] if top_k else []) + ["last.ckpt"]
    assert outcome.last_checkpoint == str(tmp_path / "run" / "last.ckpt")
    assert outcome.best_checkpoint == (
        str(tmp_path / "run" / "epoch000-step000002.ckpt") if top_k else None
    )
    assert (outcome.epochs, outcome.global_step) == (4, 8)
    for name in files:
        assert verify_checkpoint(tmp_path / "run" / name) is None
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["epoch"] == 3


def test_lightning_save_last_alone_would_leave_last_stale(
    tiny: SimpleNamespace, tmp_path: Path
) -> None:
    """Why LastCheckpoint exists: in Lightning 2.6 `save_last=True` follows the top-k saves.

    When this starts failing, Lightning refreshes `last` on its own and LastCheckpoint can go.
    """
    watch = LastSeenAtEpochStart(tmp_path / "last.ckpt")
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path, monitor="val/epoch", mode="min", save_top_k=1, save_last=True
    )
    trainer = pl.Trainer(
        max_epochs=3,
        callbacks=[checkpoint, watch],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_epoch_score_model(), datamodule=tiny.datamodule(0, 8, 3, 2, 4))
    assert watch.seen == [(1, 0), (2, 0)]


def test_trainers_write_through_the_checksum_plugin(tiny: SimpleNamespace, tmp_path: Path) -> None:
    one = DistributedTrainer(tiny.config(tmp_path), checkpoint_dir=tmp_path)
    ddp = DistributedTrainer(
        tiny.config(tmp_path, "training.strategy=ddp", "training.num_processes=2"),
        checkpoint_dir=tmp_path,
    )
    for runner in (one, ddp):
        trainer = runner.lightning_trainer()
        assert isinstance(trainer.strategy.checkpoint_io, ChecksummedCheckpointIO)
        kinds = [type(c) for c in trainer.checkpoint_callbacks]
        assert kinds == [ModelCheckpoint, LastCheckpoint]  # best first: see fit_outcome
        assert any(isinstance(c, ResumeStateCallback) for c in trainer.callbacks)


def test_fit_outcome_reads_the_checkpoint_callbacks(tiny: SimpleNamespace, tmp_path: Path) -> None:
    cfg = tiny.config(tmp_path, "training.num_epochs=2", "training.save_top_k=2")
    runner = DistributedTrainer(cfg, checkpoint_dir=tmp_path)
    outcome = runner.train(tiny.model(0, 3, 2), tiny.datamodule(0, 8, 3, 2, 4))
    assert runner.trainer is not None
    assert fit_outcome(runner.trainer) == outcome
    top_k = next(c for c in runner.trainer.callbacks if isinstance(c, ModelCheckpoint))
    assert (
        outcome.best_checkpoint == top_k.best_model_path and Path(top_k.best_model_path).is_file()
    )
    assert outcome.last_checkpoint == str(tmp_path / "last.ckpt")
    assert set(outcome.metrics) >= {"val/acc", "val/loss", "train/loss"}
