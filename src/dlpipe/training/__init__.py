"""Training (design section 2): Lightning recipe, one-process / DDP / Ray trainer, checkpoints.

from dlpipe.training import train
result = train(load_config("configs/fashion_mnist.yaml"))
"""

from dlpipe.training.module import LightningModel
from dlpipe.training.train import TrainResult, build_lightning_model, train
from dlpipe.training.trainer import DistributedTrainer, FitOutcome, TrainingError

__all__ = [
    "DistributedTrainer",
    "FitOutcome",
    "LightningModel",
    "TrainResult",
    "TrainingError",
    "build_lightning_model",
    "train",
]
