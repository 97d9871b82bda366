"""The python_function flavor of a dlpipe model package (MLmodel's `loader_module`).

    model = mlflow.pyfunc.load_model("models:/fashion_mnist_cnn@champion")
    model.predict(pd.DataFrame({"image": [png_bytes, other_png_bytes]}))
    model.predict(pd.DataFrame({"text": ["a gripping film"]}))        # text models

Input: a DataFrame with one column, `image` (PNG/JPEG bytes, base64 strings of them, uint8
H×W or H×W×C arrays, or PIL images) for image models, `text` (strings) for text models. Over
`mlflow models serve`: `{"dataframe_split": {"columns": ["image"], "data": [["<base64>"]]}}`.

Output: a DataFrame with one row per input, in order:
  label          class name of the most probable class (its index as a string without names)
  class_index    index of that class (int64)
  probability    its softmax probability
  probabilities  softmax probabilities of every class, by class index (list of float)

Each input goes through the package's own `DataPreprocessor` and the same `InferenceEngine` that
`dlpipe serve` runs (ONNX Runtime; PyTorch only for a package without model.onnx), so a version
answers here as it does over HTTP. ONNX packages never import torch.
"""

from __future__ import annotations

import base64
import binascii
import threading
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.tracking.mlflow_model import (
    IMAGE_COLUMN,
    OUTPUT_COLUMNS,
    TEXT_COLUMN,
    package_preprocessing,
)

BATCH_SIZE = 64
"""Inputs per engine call: bounds memory on large DataFrames."""


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> PackageModel:
    """MLflow's entry point; `model_config={"device": "cpu"}` overrides the default "auto"."""
    device = str((model_config or {}).get("device", "auto"))
    return PackageModel(data_path, device=device)


class PackageModel:
    """A package directory loaded for prediction on raw inputs."""

    def __init__(self, directory: str | Path, device: str = "auto") -> None:
        from dlpipe.data import DataPreprocessor
        from dlpipe.data.preprocessing import TOKENIZER_FILE
        from dlpipe.serving.engine import InferenceEngine

        self.directory = Path(directory).resolve()
        self.preprocessing = package_preprocessing(self.directory)
        tokenizer = self.directory / TOKENIZER_FILE
        self.preprocessor = DataPreprocessor(
            self.preprocessing, tokenizer_file=tokenizer if tokenizer.is_file() else None
        )
        self.engine = InferenceEngine(self.directory, device)
        # The engine takes one caller at a time; scoring servers may call from several threads.
        self._engine_lock = threading.Lock()
        self.is_text = self.preprocessing.task_type == "text_classification"
        self.column = TEXT_COLUMN if self.is_text else IMAGE_COLUMN

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        """Labels and probabilities for each input row (see the module docstring)."""
        import pandas as pd

        samples = [self._sample(value, i) for i, value in enumerate(self._values(model_input))]
        if not samples:
            return pd.DataFrame({c: [] for c in OUTPUT_COLUMNS})
        probs = np.concatenate(
            [self._probabilities(samples[i : i + BATCH_SIZE], i)
             for i in range(0, len(samples), BATCH_SIZE)]
        )  # fmt: skip
        top = probs.argmax(axis=1)
        names = self.preprocessing.class_names
        labels = [names[i] if names and i < len(names) else str(int(i)) for i in top]
        return pd.DataFrame(
            {
                "label": labels,
                "class_index": top.astype(np.int64),
                "probability": probs[np.arange(len(top)), top],
                "probabilities": [row.tolist() for row in probs],
            }
        )

    def _probabilities(self, samples: list[Any], first_row: int) -> np.ndarray:
        from dlpipe.data import InvalidInputError
        from dlpipe.serving.engine import ShapeMismatchError

        try:
            batch = self.preprocessor.preprocess_inference_batch(samples)
            with self._engine_lock:
                logits = np.asarray(self.engine.predict_batch(batch), dtype=np.float64)
        except (InvalidInputError, ShapeMismatchError) as err:
            where = f"rows {first_row}-{first_row + len(samples) - 1}"
            raise _invalid(f"{where}: {err}") from None
        # The server's softmax (dlpipe.serving.inputs.softmax_top_k), row by row, in float64.
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs: np.ndarray = z / z.sum(axis=1, keepdims=True)
        return probs

    def _values(self, model_input: Any) -> list[Any]:
        """The input rows: a DataFrame's column, a dict's entry, a list, or a numeric array
        whose first axis is the batch (N×H×W or N×H×W×C uint8)."""
        import pandas as pd

        if isinstance(model_input, pd.DataFrame):
            if self.column in model_input.columns:
                return list(model_input[self.column])
            if len(model_input.columns) == 1:
                return list(model_input.iloc[:, 0])
            raise _invalid(
                f"expected a column {self.column!r}, got columns {list(model_input.columns)}"
            )
        if isinstance(model_input, dict):
            if self.column not in model_input:
                raise _invalid(f"expected the key {self.column!r}, got {sorted(model_input)}")
            model_input = model_input[self.column]
        if isinstance(model_input, pd.Series | list | tuple | np.ndarray):
            return list(model_input)
        return [model_input]  # one sample: bytes, a string or a PIL image

    def _sample(self, value: Any, index: int) -> Any:
        if self.is_text:
            if not isinstance(value, str):
                raise _invalid(f"row {index}: expected a string, got {type(value).__name__}")
            return value
        if isinstance(value, str):  # base64 of the image bytes (JSON carries no bytes)
            try:
                return base64.b64decode(value, validate=False)
            except (binascii.Error, ValueError) as err:
                raise _invalid(f"row {index}: not base64 image bytes: {err}") from None
        if isinstance(value, np.ndarray) and value.dtype != np.uint8:
            raise _invalid(f"row {index}: image arrays must be uint8, got {value.dtype}")
        return value


def _invalid(message: str) -> Exception:
    """An error MLflow's scoring server answers with 400 (not 500)."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)
