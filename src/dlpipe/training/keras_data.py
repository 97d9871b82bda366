"""Framework-free pieces of Keras training: epoch plans, shards and classification metrics.

    plan = epoch_plan(len(labels), seed=42, epoch=3, world=2, crop_padding=3)
    mine = plan.shard(rank=1)                   # indices + augmentation draws for worker 1
    metrics = classification_metrics(logits, labels, num_classes=10)   # loss, acc, f1

An epoch's sample order and augmentation draws depend only on (seed, epoch): a resumed run sees
the same data as an uninterrupted one, and 1 or N workers see the same samples with the same
draws (each worker a strided share, padded to equal length as torch's DistributedSampler does,
since every worker of a synchronous strategy must run the same number of steps). Pure numpy, so
it is tested without TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    """Sample order and augmentation draws of one epoch, for every worker."""

    order: np.ndarray  # (world * per_worker,) sample indices, padded by wrapping around
    flip: np.ndarray  # (len(order),) bool: mirror horizontally
    shift: np.ndarray  # (len(order), 2) int: crop window offset in the padded image
    world: int

    def shard(self, rank: int) -> EpochPlan:
        """Worker `rank`'s strided share (the whole plan when world is 1)."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside 0..{self.world - 1}")
        pick = slice(rank, None, self.world)
        return EpochPlan(self.order[pick], self.flip[pick], self.shift[pick], 1)


def epoch_plan(n: int, seed: int, epoch: int, world: int = 1, crop_padding: int = 1) -> EpochPlan:
    """Shuffled order and augmentation draws for epoch `epoch` of `n` samples."""
    if n < 1:
        raise ValueError("the training split is empty")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    total = -(-n // world) * world
    order = np.concatenate([order, order[: total - n]]) if total > n else order
    flip = rng.random(total) < 0.5
    shift = rng.integers(0, 2 * crop_padding + 1, size=(total, 2), dtype=np.int64)
    return EpochPlan(order, flip, shift, world)


def batches_per_epoch(samples: int, batch_size: int, limit: float | int | None = None) -> int:
    """Batches a worker runs per epoch, after Lightning-style `limit_train_batches`."""
    full = -(-samples // batch_size)
    if limit is None:
        return full
    if isinstance(limit, float) and limit <= 1.0:
        return max(1, int(full * limit))
    return max(1, min(full, int(limit)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def confusion_matrix(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts with rows = true class, columns = predicted class."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels.astype(np.int64), predicted.astype(np.int64)), 1)
    return counts


def macro_f1(counts: np.ndarray) -> float:
    """Macro F1 from a confusion matrix; classes never seen nor predicted are left out, as
    torchmetrics' MulticlassF1Score(average="macro") does."""
    tp = np.diag(counts).astype(np.float64)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    seen = (tp + fp + fn) > 0
    if not seen.any():
        return 0.0
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[seen].mean())


def classification_metrics(
    logits: np.ndarray, labels: np.ndarray, num_classes: int
) -> tuple[dict[str, float], np.ndarray]:
    """Mean cross-entropy, top-1 accuracy and macro F1 (keys `loss`, `acc`, `f1`), and the
    confusion matrix."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("no samples to evaluate")
    logp = log_softmax(np.asarray(logits))
    loss = float(-logp[np.arange(len(labels)), labels].mean())
    predicted = logp.argmax(axis=1)
    counts = confusion_matrix(predicted, labels, num_classes)
    acc = float((predicted == labels).mean())
    return {"loss": loss, "acc": acc, "f1": macro_f1(counts)}, counts
