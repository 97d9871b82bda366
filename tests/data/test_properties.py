"""Property tests for preprocessing (design Properties 20 and 21)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dlpipe.config import PreprocessingConfig
from dlpipe.data import DataPreprocessor
from dlpipe.data.datasets import ImageBatch, ImageCollate
from dlpipe.data.preprocessing import AugmentParams

PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def image_configs(draw: st.DrawFn) -> PreprocessingConfig:
    channels = draw(st.sampled_from([1, 2, 3, 4]))
    per_channel = draw(st.booleans())
    n = channels if per_channel else 1
    unit = st.floats(-1.0, 1.0, allow_nan=False)
    spread = st.floats(0.01, 5.0, allow_nan=False)
    normalize = draw(st.booleans())
    return PreprocessingConfig(
        image_size=(draw(st.integers(1, 24)), draw(st.integers(1, 24))),
        channels=channels,
        normalization_mean=draw(st.lists(unit, min_size=n, max_size=n)) if normalize else None,
        normalization_std=draw(st.lists(spread, min_size=n, max_size=n)) if normalize else None,
        augment=draw(st.booleans()),
        class_names=draw(st.none() | st.lists(st.text(max_size=5), min_size=2, max_size=4)),
    )


@st.composite
def text_configs(draw: st.DrawFn) -> PreprocessingConfig:
    return PreprocessingConfig(
        task_type="text_classification",
        image_size=None,
        channels=None,
        normalization_mean=None,
        normalization_std=None,
        augment=draw(st.booleans()),
        tokenizer_name="minilm",
        max_sequence_length=draw(st.integers(3, 48)),
        lowercase=draw(st.booleans()),
    )


@st.composite
def raw_images(draw: st.DrawFn) -> Any:
    """A random image as a uint8 array (H×W or H×W×C), a PIL image, or PNG bytes."""
    shape = [draw(st.integers(1, 32)), draw(st.integers(1, 32))]
    layout = draw(st.sampled_from([None, 1, 2, 3, 4]))
    if layout is not None:
        shape.append(layout)
    seed = draw(st.integers(0, 2**32 - 1))
    array = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    kind = draw(st.sampled_from(["array", "pil", "png"]))
    if kind == "array":
        return array
    image = Image.fromarray(array[..., 0] if layout == 1 else array)
    if kind == "pil":
        return image
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


texts = st.text(min_size=1, max_size=60).filter(lambda t: bool(t.strip()))


def assert_same_output(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
    else:
        assert torch.equal(torch.as_tensor(a), torch.as_tensor(b))


# Feature: deep-learning-pipeline, Property 20: Preprocessing consistency between training and inference
@PROPERTY_SETTINGS
@given(data=st.data())
def test_training_and_inference_preprocessing_agree(data: st.DataObject) -> None:
    if data.draw(st.integers(0, 3), label="text when 0") == 0:
        pre = DataPreprocessor(data.draw(text_configs(), label="config"))
        text = data.draw(texts, label="text")
        inference = pre.preprocess_inference(text)
        assert_same_output(pre.preprocess_train(text), inference)
        batch = pre.preprocess_inference_batch([text, "another text"])
        assert isinstance(batch, dict)
        assert_same_output({k: v[0] for k, v in batch.items()}, inference)
        return
    config = data.draw(image_configs(), label="config")
    pre = DataPreprocessor(config)
    sample = data.draw(raw_images(), label="sample")
    inference = pre.preprocess_inference(sample)
    assert isinstance(inference, torch.Tensor)
    assert inference.shape == (config.channels, *config.image_size)  # type: ignore[misc]
    # Augmentation's random draw fixed to identity: training equals inference, bit for bit.
    identity = AugmentParams.identity(1, pre.crop_padding)
    assert_same_output(pre.preprocess_train(sample, params=identity), inference)
    seed = data.draw(st.integers(0, 2**31), label="rng seed")
    trained = pre.preprocess_train(sample, generator=torch.Generator().manual_seed(seed))
    if not config.augment:
        assert_same_output(trained, inference)
    # Serving's batch path and training's collate (augmentation off) run the same code.
    batch = pre.preprocess_inference_batch([sample, sample])
    assert isinstance(batch, np.ndarray)
    assert_same_output(batch[0], inference)
    assert_same_output(batch[1], inference)
    uint8 = pre.prepare_image(sample)[None]
    collate = ImageCollate(pre, train=not config.augment)
    x, _ = collate(ImageBatch(uint8, np.zeros(1, dtype=np.int64)))
    assert_same_output(x[0], inference)


# Feature: deep-learning-pipeline, Property 21: Preprocessing configuration round-trip
@PROPERTY_SETTINGS
@given(data=st.data())
def test_preprocessing_config_round_trip(data: st.DataObject) -> None:
    is_text = data.draw(st.integers(0, 3), label="text when 0") == 0
    config = data.draw(text_configs() if is_text else image_configs(), label="config")
    original = DataPreprocessor(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "preprocessing.json"
        original.save_config(path)
        restored = DataPreprocessor.from_file(path)
        reloaded = DataPreprocessor(PreprocessingConfig())  # a different config, replaced
        reloaded.load_config(path)
    for other in (restored, reloaded):
        assert other.config == config
        sample = data.draw(texts if is_text else raw_images(), label="sample")
        assert_same_output(
            other.preprocess_inference(sample), original.preprocess_inference(sample)
        )
        seed = data.draw(st.integers(0, 2**31), label="rng seed")
        assert_same_output(
            other.preprocess_train(sample, generator=torch.Generator().manual_seed(seed)),
            original.preprocess_train(sample, generator=torch.Generator().manual_seed(seed)),
        )
