"""Property tests for preprocessing (design Properties 20 and 21), for both frameworks.

The Keras path preprocesses with the same `DataPreprocessor`, in numpy: `train_keras` hands the
raw splits to its TensorFlow worker (`keras_fit.write_splits`, job.json), whose `load_data` and
`epoch_inputs` make the training and validation inputs (augmentation drawn by
`keras_data.epoch_plan`), and `save_keras_package` stores the preprocessing serving reads back.
Those functions need no TensorFlow, so the TensorFlow variants run them here, on every example.
"""

from __future__ import annotations

import io
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dlpipe.config import ModelConfig, PipelineConfig, PreprocessingConfig
from dlpipe.data import DataPreprocessor
from dlpipe.data.datasets import ImageBatch, ImageCollate
from dlpipe.data.preprocessing import TOKENIZER_FILE, AugmentParams
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.package import PREPROCESSING_FILE
from dlpipe.training.keras_data import EpochPlan, epoch_plan
from dlpipe.training.keras_fit import save_keras_package, write_splits
from dlpipe.training.keras_worker import DATA_FILE, JOB_FILE, Worker
from keras_session import FRAMEWORKS, Splits

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


def keras_config(preprocessing: PreprocessingConfig) -> PipelineConfig:
    """A Keras job's config around `preprocessing` (keras_text or keras_cnn)."""
    if preprocessing.task_type == "text_classification":
        model = ModelConfig(name="keras_text", framework="tensorflow", num_classes=3)
    else:
        model = ModelConfig(
            name="keras_cnn", framework="tensorflow", num_classes=3,
            in_channels=preprocessing.channels or 1,
        )  # fmt: skip
    return PipelineConfig(model=model, preprocessing=preprocessing)


def keras_worker(job: Path, cfg: PipelineConfig, samples: list[Any]) -> Worker:
    """The TensorFlow worker of a `train_keras` job on these samples, its data loaded: the
    splits as the DataModule gives them (images decoded, converted and resized to uint8, as its
    datasets' `prepare_image` does; texts as they are), written by `write_splits`, and the
    config in job.json as `train_keras` writes it."""
    pre = DataPreprocessor(cfg.preprocessing)
    raw = [s if pre.is_text else pre.prepare_image(s) for s in samples]
    pairs = [(r, i % cfg.model.num_classes) for i, r in enumerate(raw)]
    write_splits(Splits({"train": pairs, "val": pairs, "test": pairs}), job / DATA_FILE)
    (job / JOB_FILE).write_text(json.dumps({"config": cfg.model_dump(mode="json"), "world": 1}))
    worker = Worker(job, 0)
    worker.load_data()
    return worker


def keras_preprocessing_agrees(data: st.DataObject) -> None:
    """Property 20 on the Keras path: the worker's training inputs (augmentation drawn as the
    identity, or off) and validation/test inputs are serving's inputs, bit for bit."""
    is_text = data.draw(st.integers(0, 3), label="text when 0") == 0
    config = data.draw(text_configs() if is_text else image_configs(), label="config")
    samples = data.draw(st.lists(texts if is_text else raw_images(), min_size=1, max_size=4),
                        label="samples")  # fmt: skip
    cfg = keras_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        worker = keras_worker(Path(tmp), cfg, samples)
    served = DataPreprocessor(config).preprocess_inference_batch(samples)  # serving's batch
    n = len(samples)
    seed = data.draw(st.integers(0, 2**31), label="seed")
    epoch = data.draw(st.integers(0, 99), label="epoch")
    # An epoch's order and augmentation draws, with the padding the worker uses.
    plan = epoch_plan(n, seed, epoch, crop_padding=getattr(worker.pre, "crop_padding", 1))
    if is_text:
        assert isinstance(served, dict)
        want = (served["input_ids"], served["attention_mask"])
        for split in ("train", "val", "test"):
            for got, expected in zip(worker.inputs[split], want, strict=True):
                assert np.array_equal(got, expected), split
        for got, expected in zip(worker.epoch_inputs(plan), want, strict=True):
            assert np.array_equal(got, expected[plan.order])
        return
    assert isinstance(served, np.ndarray)
    pad = worker.pre.crop_padding
    identity = EpochPlan(np.arange(n), np.zeros(n, bool), np.full((n, 2), pad, np.int64), 1)
    assert_same_output(worker.epoch_inputs(identity), served)
    assert_same_output(worker.inputs["val"], served)
    assert_same_output(worker.inputs["test"], served)
    trained = worker.epoch_inputs(plan)
    if not config.augment:
        assert_same_output(trained, served[plan.order])
    else:  # the draws are the DataPreprocessor's augmentation: the identity draw is inference
        images = np.stack([worker.pre.prepare_image(s) for s in samples])[plan.order]
        params = AugmentParams(plan.flip, plan.shift)
        assert_same_output(trained, worker.pre.train_batch(images, params=params))
        kept = ~plan.flip & (plan.shift == pad).all(axis=1)
        assert_same_output(trained[kept], served[plan.order][kept])


# Feature: deep-learning-pipeline, Property 20: Preprocessing consistency between training and inference
@pytest.mark.parametrize("framework", FRAMEWORKS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_training_and_inference_preprocessing_agree(framework: str, data: st.DataObject) -> None:
    if framework == "tensorflow":
        keras_preprocessing_agrees(data)
        return
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


def keras_round_trips(config: PreprocessingConfig, original: DataPreprocessor) -> list[Any]:
    """The preprocessors the Keras path rebuilds from a saved configuration: its TensorFlow
    worker's (from job.json) and serving's (from the package `save_keras_package` writes:
    preprocessing.json, and tokenizer.json for text)."""
    cfg = keras_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / JOB_FILE).write_text(
            json.dumps({"config": cfg.model_dump(mode="json"), "world": 1})
        )
        worker = Worker(root, 0).pre
        meta = ModelMetadata(
            "p21", "tensorflow", "fp32", 0.0, datetime.now(UTC), {"test/acc": 0.5}, config
        )
        keras_file = root / "trained.keras"
        keras_file.write_bytes(b"model.keras stand-in: the package's preprocessing is tested")
        package = save_keras_package(root / "package", cfg, meta, keras_file,
                                     SimpleNamespace(preprocessor=original))  # fmt: skip
        # What serving reads: served.py's preprocessing.json, the package's own tokenizer.
        stored = PreprocessingConfig.model_validate_json((package / PREPROCESSING_FILE).read_text())
        tokenizer = package / TOKENIZER_FILE if config.task_type == "text_classification" else None
        served = DataPreprocessor(stored, tokenizer_file=tokenizer)
    return [worker, served]


# Feature: deep-learning-pipeline, Property 21: Preprocessing configuration round-trip
@pytest.mark.parametrize("framework", FRAMEWORKS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_preprocessing_config_round_trip(framework: str, data: st.DataObject) -> None:
    is_text = data.draw(st.integers(0, 3), label="text when 0") == 0
    config = data.draw(text_configs() if is_text else image_configs(), label="config")
    original = DataPreprocessor(config)
    if framework == "tensorflow":
        for other in keras_round_trips(config, original):
            assert other.config == config
            sample = data.draw(texts if is_text else raw_images(), label="sample")
            assert_same_output(other.preprocess_inference_batch([sample]),
                               original.preprocess_inference_batch([sample]))  # fmt: skip
            if not is_text:  # training inputs, augmentation drawn as the worker draws it
                plan = epoch_plan(1, data.draw(st.integers(0, 2**31), label="seed"), 0,
                                  crop_padding=original.crop_padding)  # fmt: skip
                params = AugmentParams(plan.flip, plan.shift)
                image = original.prepare_image(sample)[None]
                assert_same_output(other.train_batch(other.prepare_image(sample)[None], params=params),
                                   original.train_batch(image, params=params))  # fmt: skip
        return
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
