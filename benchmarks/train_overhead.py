"""Lightning's per-epoch training time next to a plain PyTorch loop: same model, data and batch.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/train_overhead.py --samples 10000 --epochs 3

Both sides run `simple_cnn` (channels-last) on the same Fashion-MNIST DataLoader (dlpipe's
datamodule, same preprocessing and augmentation), AdamW + one-cycle stepped per batch, loss and
accuracy per step.
Lightning runs the dlpipe recipe (`LightningModel`) with validation, checkpoints and the progress
bar off, so the table isolates the framework's per-step overhead. The first epoch is warm-up;
the ratio uses the fastest of the other epochs (the least disturbed by other load on a shared
machine); medians are shown too. Target: Lightning within 10% of plain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from dlpipe.config import load_config
from dlpipe.data import build_datamodule
from dlpipe.models import create_model
from dlpipe.training.module import LightningModel


class EpochTimer(pl.Callback):
    """Wall time of each training epoch (batches only, no validation)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.times.append(time.perf_counter() - self._start)


def plain_epochs(loader: Any, epochs: int, lr: float, seed: int) -> list[float]:
    """A hand-written loop doing the same per-step work as `LightningModel.training_step`."""
    torch.manual_seed(seed)
    net = create_model("simple_cnn", 10, 1).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total + 1)
    times = []
    net.train()
    for _ in range(epochs):
        start = time.perf_counter()
        correct = seen = 0
        for x, y in loader:
            logits = net(x.contiguous(memory_format=torch.channels_last))
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(y)
        times.append(time.perf_counter() - start)
    return times


def lightning_epochs(datamodule: Any, epochs: int, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    model = LightningModel(
        create_model("simple_cnn", 10, 1), 10, learning_rate=lr, weight_decay=1e-4
    )
    timer = EpochTimer()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        callbacks=[timer],
    )
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
    return timer.times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10_000, help="training images (max 54000)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per side (first is warm-up)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    epochs = max(2, args.epochs)
    cfg = load_config(
        None,
        [
            f"data.limit_train_samples={args.samples}",
            f"training.batch_size={args.batch_size}",
        ],
    )
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    print(
        f"simple_cnn, {args.samples} Fashion-MNIST images, batch {args.batch_size}, "
        f"{len(loader)} steps/epoch, {torch.get_num_threads()} threads, {epochs} epochs per side"
    )
    plain = plain_epochs(loader, epochs, args.lr, seed=0)
    light = lightning_epochs(datamodule, epochs, args.lr, seed=0)
    plain_s, light_s = min(plain[1:]), min(light[1:])
    ratio = light_s / plain_s
    rows = [
        ("plain PyTorch loop", plain_s, plain),
        ("Lightning (dlpipe LightningModel)", light_s, light),
    ]
    print(f"{'loop':36s} {'best s/epoch':>12s} {'median':>7s} {'img/s':>7s}   all epochs (s)")
    for name, seconds, every in rows:
        all_epochs = " ".join(f"{t:.2f}" for t in every)
        median = statistics.median(every[1:])
        print(
            f"{name:36s} {seconds:12.2f} {median:7.2f} {args.samples / seconds:7.0f}   {all_epochs}"
        )
    verdict = "within" if ratio <= 1.10 else "NOT within"
    print(f"ratio Lightning / plain = {ratio:.3f} ({verdict} the 10% target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
