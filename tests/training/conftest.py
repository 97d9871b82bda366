"""Fixtures for training tests: tiny, fast configs on the real Fashion-MNIST data."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dlpipe.config import PipelineConfig, load_config
from dlpipe.training.module import LightningModel

# Lightning's per-fit banner ("GPU available: ...") would drown the test output.
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

ROOT = Path(__file__).resolve().parents[2]
FASHION_CONFIG = ROOT / "configs" / "fashion_mnist.yaml"


@pytest.fixture
def fmnist_config(tmp_path: Path) -> Callable[..., PipelineConfig]:
    """`fmnist_config("training.num_epochs=2", ...)`: Fashion-MNIST, 256 training samples."""

    def make(*overrides: str) -> PipelineConfig:
        base = [
            "data.limit_train_samples=256",
            "data.limit_eval_samples=128",
            "training.batch_size=64",
            "training.num_epochs=1",
            "training.progress_bar=false",
            f"training.checkpoint_dir={tmp_path / 'checkpoints'}",
        ]
        return load_config(FASHION_CONFIG, [*base, *overrides])

    return make


def tiny_datamodule(
    seed: int, samples: int, in_dim: int, classes: int, batch_size: int
) -> pl.LightningDataModule:
    """Random features and labels (shuffled training loader, plain validation loader)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, in_dim, generator=g)
    y = torch.randint(0, classes, (samples,), generator=g)
    data = TensorDataset(x, y)
    return pl.LightningDataModule.from_datasets(
        train_dataset=data, val_dataset=data, batch_size=batch_size
    )


def tiny_model(
    seed: int,
    in_dim: int,
    classes: int,
    hidden: int = 8,
    learning_rate: float = 0.01,
    scheduler: str = "cosine",
    total_steps: int | None = None,
) -> LightningModel:
    """A two-layer MLP (with dropout, so the RNG matters) in the training recipe."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, classes)
    )
    return LightningModel(
        net,
        num_classes=classes,
        learning_rate=learning_rate,
        weight_decay=0.01,
        scheduler=scheduler,  # type: ignore[arg-type]
        total_steps=total_steps,
    )


def small_config(checkpoint_dir: Path, *overrides: str) -> PipelineConfig:
    """Default config, quiet, checkpoints under `checkpoint_dir`."""
    return load_config(
        None,
        [
            "training.progress_bar=false",
            f"training.checkpoint_dir={checkpoint_dir}",
            "training.deterministic=true",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def tiny() -> SimpleNamespace:
    """Helpers for cheap property examples: `tiny.datamodule`, `tiny.model`, `tiny.config`."""
    return SimpleNamespace(datamodule=tiny_datamodule, model=tiny_model, config=small_config)
