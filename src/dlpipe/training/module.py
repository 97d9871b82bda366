"""`LightningModel`: the LightningModule is handed its network and only adds the training recipe.

    model = LightningModel(create_model("simple_cnn", 10), num_classes=10,
                           task="image_classification", learning_rate=3e-3)

Logged keys carry a stage prefix: `train/loss`, `train/acc`, `val/loss`, `val/acc`, `val/f1`,
`test/loss`, `test/acc`, `test/f1` (F1 is macro-averaged). Optimizer: AdamW; schedule: cosine
or one-cycle, stepped every optimizer step.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

Task = Literal["image_classification", "text_classification"]
Scheduler = Literal["cosine", "onecycle", "none"]


class LightningModel(pl.LightningModule):
    """Classification training recipe around any `net` from `dlpipe.models`.

    Args:
        net: image nets take `x`; text nets take `input_ids, attention_mask`.
        num_classes: number of classes.
        task: `image_classification` or `text_classification` (how batches are unpacked).
        learning_rate: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        scheduler: `cosine`, `onecycle` or `none`; stepped per optimizer step.
        total_steps: optimizer steps of the whole run; None asks the trainer.
        channels_last: keep image tensors in NHWC layout, which oneDNN convolutions run
            much faster on CPU (values and state_dict are unchanged).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        task: Task = "image_classification",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: Scheduler = "onecycle",
        total_steps: int | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if scheduler not in ("cosine", "onecycle", "none"):
            raise ValueError(f"scheduler must be cosine, onecycle or none, got {scheduler!r}")
        # Builders may hand over a network in eval mode (e.g. `from_pretrained`); Lightning 2.6
        # keeps module modes as found, so dropout would silently stay off during training.
        self.net = net.train()
        self.num_classes = num_classes
        self.task = task
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.scheduler_name = scheduler
        self.total_steps = total_steps
        self.channels_last = channels_last and task == "image_classification"
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.save_hyperparameters(ignore=["net"])
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_f1 = MulticlassF1Score(num_classes, average="macro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)

    def forward(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, dict):
            return self.net(inputs["input_ids"], inputs["attention_mask"])
        if self.channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return self.net(inputs)

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cross-entropy of one batch; returns (loss, logits, targets)."""
        inputs, targets = batch
        logits = self(inputs)
        return F.cross_entropy(logits, targets), logits, targets

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, logits, y = self.compute_loss(batch)
        self.train_acc(logits.detach(), y)
        n = y.shape[0]
        self.log("loss", loss.detach(), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        self.log(
            "train/loss", loss.detach(), on_step=False, on_epoch=True, sync_dist=True, batch_size=n
        )
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=n)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits, y = self.compute_loss(batch)
        n = y.shape[0]
        self.val_acc(logits, y)
        self.val_f1(logits, y)
        self.log("val/loss", loss, sync_dist=True, prog_bar=True, batch_size=n)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=n)
        self.log("val/f1", self.val_f1, batch_size=n)
        return {"loss": loss}

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss, logits, y = self.compute_loss(batch)
        n = y.shape[0]
        self.test_acc(logits, y)
        self.test_f1(logits, y)
        self.test_confusion.update(logits, y)
        self.log("test/loss", loss, sync_dist=True, batch_size=n)
        self.log("test/acc", self.test_acc, batch_size=n)
        self.log("test/f1", self.test_f1, batch_size=n)
        return {"loss": loss}

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def schedule_steps(self) -> int:
        """Optimizer steps the LR schedule spans: `total_steps`, else the trainer's estimate."""
        if self.total_steps is not None:
            return self.total_steps
        steps = int(self.trainer.estimated_stepping_batches)
        if steps <= 0 or steps == float("inf"):
            raise ValueError("cannot size the LR schedule: set total_steps or training limits")
        return steps

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=self.learning_rate, weight_decay=self.weight_decay
        )
        if self.scheduler_name == "none":
            return optimizer
        total = max(1, self.schedule_steps())
        scheduler: torch.optim.lr_scheduler.LRScheduler
        if self.scheduler_name == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        else:
            # OneCycle must never be stepped past its end; one spare step covers rounding.
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.learning_rate, total_steps=total + 1
            )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
