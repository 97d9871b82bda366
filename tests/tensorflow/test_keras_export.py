"""Keras models from the catalogue, run and exported in TensorFlow subprocesses.

What property tests need to cover Keras too: `keras_build` (a random model of any catalogue
entry), `keras_predict` (its logits on numpy inputs) and `export_keras` (an ONNX file checked
against those logits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from dlpipe.models.keras_runner import KerasRunnerError, keras_build, keras_predict
from dlpipe.optimize.onnx_export import ParityError, make_session
from dlpipe.optimize.quantize import quantize_int8_static
from dlpipe.optimize.tf_export import check_keras_parity, default_parity_inputs, export_keras


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "cnn.keras"
    return keras_build("keras_cnn", path, num_classes=7, in_channels=3, seed=1, dropout=0.3)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "text.keras"
    return keras_build("keras_text", path, num_classes=2, seed=2, vocab_size=500)


def test_cnn_takes_channels_first_images_and_gives_logits(cnn: Path) -> None:
    x = np.random.default_rng(0).normal(size=(5, 3, 28, 28)).astype(np.float32)
    one, both = keras_predict(cnn, [x[:1], x])
    assert both.shape == (5, 7) and both.dtype == np.float32
    # Inference mode: no dropout, and a sample's logits do not depend on its batch.
    np.testing.assert_allclose(one[0], both[0], atol=1e-5)
    with pytest.raises(KerasRunnerError, match="predict failed"):
        keras_predict(cnn, x[:, :1])  # one channel into a 3-channel model


def test_text_model_ignores_padding(text: Path) -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(1, 500, (4, 12)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, 6:] = 0
    other = ids.copy()
    other[:, 6:] = rng.integers(1, 500, (4, 6))  # different tokens where the mask is 0
    a, b, short = keras_predict(
        text,
        [
            {"input_ids": ids, "attention_mask": mask},
            {"input_ids": other, "attention_mask": mask},
            {"input_ids": ids[:, :6], "attention_mask": mask[:, :6]},
        ],
    )
    assert a.shape == (4, 2)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(a, short, atol=1e-5)  # sequence axis is dynamic


def test_cnn_exports_with_parity_and_dynamic_batch(cnn: Path, tmp_path: Path) -> None:
    batches = default_parity_inputs(["input"], [3, 28, 28])
    result = export_keras(cnn, tmp_path / "cnn.onnx", ["input"], batches)
    assert result.exporter == "tf2onnx" and result.max_abs_diff <= 1e-4
    graph = onnx.load(str(result.path))
    assert [o.name for o in graph.graph.output] == ["logits"]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    x = np.random.default_rng(5).normal(size=(9, 3, 28, 28)).astype(np.float32)
    want = keras_predict(cnn, x)
    got = make_session(result.path).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ParityError):  # the check does fail on wrong logits
        check_keras_parity(result.path, [{"input": x}], [want + 1e-2])

    int8 = quantize_int8_static(result.path, tmp_path / "cnn.int8.onnx", [x])
    assert int8.size_ratio < 0.35  # int8 weights: about a quarter of the float32 bytes


def test_text_exports_with_dynamic_batch_and_sequence(text: Path, tmp_path: Path) -> None:
    names = ["input_ids", "attention_mask"]
    result = export_keras(text, tmp_path / "text.onnx", names, default_parity_inputs(names, [16]))
    assert result.max_abs_diff <= 1e-4 and result.input_names == names
    dims = onnx.load(str(result.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
