"""Quality fixtures: real Fashion-MNIST images, a served CNN package carrying a drift profile
computed from real training images (the tests' own helpers build the package)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))

from serving_helpers import make_package

from dlpipe.data import DataPreprocessor
from dlpipe.data.sources import find_fashion_mnist, load_fashion_mnist
from dlpipe.quality.profile import build_profile
from dlpipe.tracking.package import load_package_config

os.environ.setdefault("OMP_NUM_THREADS", "1")
PROFILE_IMAGES = 2000


@pytest.fixture(scope="session")
def fashion() -> dict[str, np.ndarray]:
    """Fashion-MNIST (the Debian package's IDX files): train and test images, uint8 28x28."""
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
    data = load_fashion_mnist(download=False)
    return {"train": data["train"].images, "test": data["test"].images}


def predicted_classes(package: Path, images: np.ndarray) -> np.ndarray:
    """The package's model's top-1 classes for raw images (its own preprocessing, ONNX)."""
    import onnxruntime as ort

    pre = DataPreprocessor(load_package_config(package).preprocessing)
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input": pre.preprocess_inference_batch(list(images))})[0]
    return np.argmax(logits, axis=1)


@pytest.fixture(scope="session")
def profiled_package(tmp_path_factory: pytest.TempPathFactory, fashion) -> Path:
    """A simple_cnn package whose drift_profile.json describes 2000 real training images and
    the classes the model predicts for them."""
    package = make_package(tmp_path_factory.mktemp("quality"), version="1", onnx=True, width=8)
    images = fashion["train"][:PROFILE_IMAGES]
    counts = np.bincount(predicted_classes(package, images), minlength=10)
    pre = DataPreprocessor(load_package_config(package).preprocessing)
    profile = build_profile(pre, list(images), predicted_counts=counts, source="train[:2000]")
    profile.save(package)
    return package
