"""Gradient accumulation: `accumulate_grad_batches=2` over batches of 32 trains the same weights as
batches of 64 (same samples in the same order, same optimizer steps and learning rates)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from dlpipe.training.module import LightningModel
from dlpipe.training.trainer import DistributedTrainer

from .conftest import small_config, tiny_datamodule

SAMPLES, IN_DIM, CLASSES = 512, 8, 3


def trained_weights(tmp_path: Path, batch_size: int, accumulate: int) -> list[torch.Tensor]:
    """Two epochs of the training recipe through `DistributedTrainer`, from the same start."""
    pl.seed_everything(7, verbose=False)
    # No dropout and no batch norm: nothing but the batch split may tell the two runs apart.
    net = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, CLASSES))
    model = LightningModel(net, CLASSES, learning_rate=0.05, scheduler="cosine")
    data = tiny_datamodule(3, SAMPLES, IN_DIM, CLASSES, batch_size)
    cfg = small_config(
        tmp_path / f"b{batch_size}-a{accumulate}",
        "training.num_epochs=2",
        f"training.accumulate_grad_batches={accumulate}",
        "training.save_top_k=0",
    )
    outcome = DistributedTrainer(cfg).train(model, data)
    assert outcome.global_step == 2 * SAMPLES // (batch_size * accumulate)
    return [p.detach().clone() for p in net.parameters()]


def test_accumulating_two_batches_of_32_equals_one_batch_of_64(tmp_path: Path) -> None:
    large = trained_weights(tmp_path, 64, 1)
    accumulated = trained_weights(tmp_path, 32, 2)
    unaccumulated = trained_weights(tmp_path, 32, 1)  # what the check must tell apart

    def gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

    print(
        f"largest weight difference from batch 64: accumulated 2 x 32 "
        f"{gap(large, accumulated):.2e}, plain batch 32 {gap(large, unaccumulated):.2e}"
    )
    assert gap(large, accumulated) < 1e-5
    assert gap(large, unaccumulated) > 1e-2
