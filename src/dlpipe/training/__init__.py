"""Training (design section 2): Lightning recipe, one-process / DDP / Ray trainer, checkpoints.

from dlpipe.training import train
result = train(load_config("configs/fashion_mnist.yaml"))

The names below load on first use: a TensorFlow worker (`dlpipe.training.keras_worker`) lives in
this package and must never import torch or Lightning.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dlpipe.training.module import LightningModel
    from dlpipe.training.train import TrainResult, build_lightning_model, train
    from dlpipe.training.trainer import DistributedTrainer, FitOutcome, TrainingError

_HOME = {
    "LightningModel": "dlpipe.training.module",
    "TrainResult": "dlpipe.training.train",
    "build_lightning_model": "dlpipe.training.train",
    "train": "dlpipe.training.train",
    "DistributedTrainer": "dlpipe.training.trainer",
    "FitOutcome": "dlpipe.training.trainer",
    "TrainingError": "dlpipe.training.trainer",
}

__all__ = [
    "DistributedTrainer",
    "FitOutcome",
    "LightningModel",
    "TrainResult",
    "TrainingError",
    "build_lightning_model",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dlpipe.training' has no attribute {name!r}")


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        # Loading the submodule `dlpipe.training.train` binds it here as `train`; the package's
        # `train` stays the function, as it was when this file imported everything eagerly.
        if name == "train" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
