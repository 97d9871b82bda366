"""The architecture catalogue: which networks exist, what task and framework each is for.

    list_models("image_classification")     # ['mobilenet_v3_small', 'resnet18', ...]
    model_task("minilm")                    # 'text_classification'

Torch-free on purpose: the config schema checks `model.name` against this table, and reading a
config must not import a framework. Builders live in `vision.py` / `text.py` (PyTorch) and
`keras.py` (TensorFlow) and are imported only when a model is built. Not to be confused with
the MLflow Model Registry (`dlpipe.tracking.registry`), which stores trained versions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Task = Literal["image_classification", "text_classification"]
Framework = Literal["pytorch", "tensorflow"]
TASKS: tuple[Task, ...] = ("image_classification", "text_classification")


@dataclass(frozen=True)
class Architecture:
    """One buildable network: `builder` is a callable or a `"module:function"` path."""

    name: str
    task: Task
    builder: str | Callable[..., Any]
    description: str
    framework: Framework = "pytorch"

    def load_builder(self) -> Callable[..., Any]:
        """The builder function (imports its module on first use)."""
        if callable(self.builder):
            return self.builder
        module, _, function = self.builder.partition(":")
        builder: Callable[..., Any] = getattr(importlib.import_module(module), function)
        return builder

    @property
    def input_names(self) -> list[str]:
        """Input names of the exported graph, in forward-argument order."""
        if self.task == "text_classification":
            return ["input_ids", "attention_mask"]
        return ["input"]


def _builtin(
    name: str, task: Task, builder: str, description: str, framework: Framework = "pytorch"
) -> Architecture:
    return Architecture(name, task, builder, description, framework)


_CATALOG: dict[str, Architecture] = {
    a.name: a
    for a in (
        _builtin(
            "simple_cnn",
            "image_classification",
            "dlpipe.models.vision:simple_cnn",
            "small 2-block CNN for 28x28 images",
        ),
        _builtin(
            "resnet18",
            "image_classification",
            "dlpipe.models.vision:resnet18",
            "torchvision ResNet-18",
        ),
        _builtin(
            "resnet50",
            "image_classification",
            "dlpipe.models.vision:resnet50",
            "torchvision ResNet-50",
        ),
        _builtin(
            "mobilenet_v3_small",
            "image_classification",
            "dlpipe.models.vision:mobilenet_v3_small",
            "torchvision MobileNetV3-Small",
        ),
        _builtin(
            "minilm",
            "text_classification",
            "dlpipe.models.text:minilm",
            "all-MiniLM-L6-v2 encoder (22.7M) + head",
        ),
        _builtin(
            "bert-base",
            "text_classification",
            "dlpipe.models.text:bert_base",
            "BERT-base architecture (random init)",
        ),
        _builtin(
            "keras_cnn",
            "image_classification",
            "dlpipe.models.keras:keras_cnn",
            "Keras 3 CNN for 28x28 images (2 conv blocks), channels-first input",
            framework="tensorflow",
        ),
        _builtin(
            "keras_text",
            "text_classification",
            "dlpipe.models.keras:keras_text",
            "Keras 3 embedding + Conv1D text classifier over MiniLM WordPiece ids",
            framework="tensorflow",
        ),
    )
}


def register_model(
    name: str, task: Task, description: str = "", framework: Framework = "pytorch"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: make `builder(num_classes, in_channels, **kw)` buildable under `name`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        if name in _CATALOG:
            raise ValueError(f"model {name!r} is already registered")
        doc = description or ((builder.__doc__ or "").strip().splitlines() or [""])[0]
        _CATALOG[name] = Architecture(name, task, builder, doc, framework)
        return builder

    return wrap


def list_models(task: Task | None = None, framework: Framework | None = None) -> list[str]:
    """Known architecture names, optionally only those for one task and/or framework."""
    return sorted(
        n
        for n, a in _CATALOG.items()
        if (task is None or a.task == task) and (framework is None or a.framework == framework)
    )


def get_architecture(name: str) -> Architecture:
    """The catalogue entry of `name`; ValueError naming the known ones otherwise."""
    if name not in _CATALOG:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(sorted(_CATALOG))}")
    return _CATALOG[name]


def model_task(name: str) -> Task:
    """The task an architecture solves."""
    return get_architecture(name).task


def model_framework(name: str) -> Framework:
    """The framework an architecture is built with."""
    return get_architecture(name).framework


def input_names(name: str) -> list[str]:
    """ONNX input names of an architecture."""
    return get_architecture(name).input_names
