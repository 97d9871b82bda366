"""Reading `.keras` archives without TensorFlow (h5py), for comparisons in the pytest process."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
KERAS_CONFIG = ROOT / "configs" / "fashion_mnist_keras.yaml"
TEXT_CONFIG = ROOT / "configs" / "rotten_tomatoes_keras.yaml"


def keras_weights(path: str | Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Every array in a `.keras` file's model.weights.h5 (layers, optimizer, ...) by h5 path."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read("model.weights.h5")
    out: dict[str, np.ndarray] = {}
    with h5py.File(io.BytesIO(data), "r") as h5:

        def visit(name: str, node: object) -> None:
            if isinstance(node, h5py.Dataset) and name.startswith(prefix):
                out[name] = np.asarray(node)

        h5.visititems(visit)
    return out
