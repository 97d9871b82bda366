"""InferenceEngine on ONNX Runtime and its PyTorch fallback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from dlpipe.serving.engine import InferenceEngine, ModelLoadError, ShapeMismatchError
from dlpipe.tracking.package import ONNX_FILE


def test_onnx_engine_batches_and_singles_agree(cnn_package: Path) -> None:
    engine = InferenceEngine(cnn_package, "cpu")
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)
    batch = engine.predict_batch(x)
    assert batch.shape == (5, 10)
    np.testing.assert_allclose(engine.predict(x[2]), batch[2], rtol=1e-4, atol=1e-5)
    info = engine.get_model_info()
    assert info["framework"] == "onnx"
    assert info["providers"][-1] == "CPUExecutionProvider"
    assert info["inputs"][0]["shape"][1:] == [1, 28, 28]


def test_pytorch_fallback_matches_onnx(cnn_package: Path, tmp_path: Path) -> None:
    torch_only = tmp_path / "torch_only"
    shutil.copytree(cnn_package, torch_only)
    (torch_only / ONNX_FILE).unlink()
    onnx_engine = InferenceEngine(cnn_package, "cpu")
    torch_engine = InferenceEngine(torch_only, "cpu")
    assert torch_engine.get_model_info()["framework"] == "pytorch"
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(
        torch_engine.predict_batch(x), onnx_engine.predict_batch(x), rtol=1e-3, atol=1e-4
    )


def test_wrong_shapes_are_named(cnn_package: Path) -> None:
    engine = InferenceEngine(cnn_package, "cpu")
    with pytest.raises(ShapeMismatchError, match="dimension 2 must be 28"):
        engine.predict_batch(np.zeros((1, 1, 27, 28), np.float32))
    with pytest.raises(ShapeMismatchError, match="3 dimensions"):
        engine.predict_batch(np.zeros((1, 28, 28), np.float32))


def test_missing_or_broken_model_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        InferenceEngine(tmp_path / "nope")
    (tmp_path / ONNX_FILE).write_bytes(b"not a graph")
    with pytest.raises(ModelLoadError, match="could not load"):
        InferenceEngine(tmp_path)
