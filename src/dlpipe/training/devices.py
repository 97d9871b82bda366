"""Checks of a training config against this machine, run where a job starts (never in the schema).

check_devices(cfg.training)   # ConfigError when more GPUs are asked for than exist
"""

from __future__ import annotations

from dlpipe.config import ConfigError, TrainingConfig


def cuda_device_count() -> int:
    """CUDA devices torch sees here (0 without a GPU or a CUDA build)."""
    import torch

    return int(torch.cuda.device_count())


def check_devices(training: TrainingConfig) -> None:
    """Refuse a job this machine cannot run, naming the key and what is available."""
    if training.num_gpus > 0:
        available = cuda_device_count()
        if training.num_gpus > available:
            raise ConfigError(
                f"training.num_gpus={training.num_gpus} but {available} CUDA device(s) are "
                "available on this machine"
            )
