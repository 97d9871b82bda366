"""Model architectures behind a name registry (see `registry.py`)."""

from dlpipe.models.registry import (
    create_model,
    example_inputs,
    input_names,
    list_models,
    model_task,
    register_model,
)

__all__ = [
    "create_model",
    "example_inputs",
    "input_names",
    "list_models",
    "model_task",
    "register_model",
]
