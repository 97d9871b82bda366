"""Model architectures: a torch-free catalogue (`architectures.py`) and timm-style builders.

    from dlpipe.models import create_model, list_models
    net = create_model("simple_cnn", num_classes=10)

`create_model` and `example_inputs` import the framework on first use, so the catalogue can be
read (e.g. by the config schema) without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dlpipe.models.architectures import (
    Architecture,
    get_architecture,
    input_names,
    list_models,
    model_framework,
    model_task,
    register_model,
)

if TYPE_CHECKING:
    from dlpipe.models.factory import create_model, example_inputs

__all__ = [
    "Architecture",
    "create_model",
    "example_inputs",
    "get_architecture",
    "input_names",
    "list_models",
    "model_framework",
    "model_task",
    "register_model",
]


def __getattr__(name: str) -> Any:
    if name in ("create_model", "example_inputs"):
        from dlpipe.models import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'dlpipe.models' has no attribute {name!r}")
