"""Build networks by architecture name, timm style (the catalogue is `architectures.py`).

net = create_model("resnet18", num_classes=10, in_channels=1)
x, = example_inputs("resnet18", 2, cfg.preprocessing)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dlpipe.models.architectures import get_architecture, model_task

if TYPE_CHECKING:
    from dlpipe.config import PreprocessingConfig


def create_model(
    name: str,
    num_classes: int,
    in_channels: int = 1,
    *,
    pretrained: bool = False,
    weights_path: str | None = None,
    dropout: float = 0.1,
    **extra: Any,
) -> nn.Module:
    """Build an architecture; optionally load a local state_dict from `weights_path`."""
    arch = get_architecture(name)
    if arch.framework != "pytorch":
        # Building it would import TensorFlow into a process that has torch loaded.
        raise ValueError(
            f"model {name!r} is a {arch.framework} (Keras) model: build it in a TensorFlow "
            "process with dlpipe.models.keras.build_keras_model"
        )
    builder = arch.load_builder()
    net: nn.Module = builder(
        num_classes=num_classes,
        in_channels=in_channels,
        pretrained=pretrained,
        dropout=dropout,
        **extra,
    )
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"weights_path not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            # A Lightning checkpoint: strip the LightningModule's `net.` prefix.
            state = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
        net.load_state_dict(state)
    return net


def example_inputs(
    name: str, batch_size: int, preprocessing: PreprocessingConfig
) -> tuple[torch.Tensor, ...]:
    """Dummy inputs in forward-argument order, shaped as preprocessing produces them."""
    if model_task(name) == "text_classification":
        length = preprocessing.max_sequence_length or 128
        ids = torch.randint(1, 1000, (batch_size, length), dtype=torch.long)
        mask = torch.ones(batch_size, length, dtype=torch.long)
        return ids, mask
    h, w = preprocessing.image_size or (28, 28)
    c = preprocessing.channels or 1
    return (torch.randn(batch_size, c, h, w),)
