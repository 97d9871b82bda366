"""Model registry in the timm style: builders register under a name, callers ask by name.

net = create_model("resnet18", num_classes=10, in_channels=1)
list_models("image_classification")
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from dlpipe.config import PreprocessingConfig

Task = Literal["image_classification", "text_classification"]
Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    task: Task
    builder: Builder
    description: str


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, task: Task, description: str = "") -> Callable[[Builder], Builder]:
    """Decorator: make `builder(num_classes, in_channels, **kw) -> nn.Module` available by name."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        doc = description or (builder.__doc__ or "").strip().splitlines()[0:1]
        _REGISTRY[name] = ModelEntry(
            name, task, builder, doc if isinstance(doc, str) else "".join(doc)
        )
        return builder

    return wrap


def _ensure_builtin() -> None:
    # Importing the builder modules registers them; done lazily to keep `import dlpipe` cheap.
    from dlpipe.models import text, vision  # noqa: F401


def list_models(task: Task | None = None) -> list[str]:
    """Registered model names, optionally only those for one task."""
    _ensure_builtin()
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def get_entry(name: str) -> ModelEntry:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def model_task(name: str) -> Task:
    """The task a registered model solves."""
    return get_entry(name).task


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
    """Build a registered model; optionally load a local state_dict from `weights_path`."""
    entry = get_entry(name)
    net = entry.builder(
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


def input_names(name: str) -> list[str]:
    """ONNX input names for a registered model."""
    if model_task(name) == "text_classification":
        return ["input_ids", "attention_mask"]
    return ["input"]
