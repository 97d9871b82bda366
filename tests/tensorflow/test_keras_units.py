"""Framework-free parts of Keras training: epoch plans, metrics, checkpoints, config and catalogue."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassF1Score

from dlpipe.config import ConfigError, load_config
from dlpipe.data.preprocessing import AugmentParams, DataPreprocessor
from dlpipe.models import create_model, list_models, model_framework
from dlpipe.training.keras_checkpoint import (
    KerasCheckpointCorruptedWarning,
    KerasCheckpointError,
    publish_checkpoint,
    read_state,
    resolve_keras_checkpoint,
    verify_keras_checkpoint,
)
from dlpipe.training.keras_data import (
    EpochPlan,
    batches_per_epoch,
    classification_metrics,
    epoch_plan,
)
from dlpipe.training.keras_fit import write_splits
from dlpipe.training.keras_worker import DATA_FILE, JOB_FILE, Worker


def test_epoch_plan_depends_only_on_seed_and_epoch() -> None:
    a, b = epoch_plan(101, seed=7, epoch=3, crop_padding=3), epoch_plan(101, 7, 3, 1, 3)
    assert np.array_equal(a.order, b.order) and np.array_equal(a.shift, b.shift)
    assert not np.array_equal(a.order, epoch_plan(101, 7, 4, 1, 3).order)
    assert sorted(a.order.tolist()) == list(range(101))
    assert a.shift.min() >= 0 and a.shift.max() <= 6


def test_worker_shards_cover_the_epoch_with_equal_lengths() -> None:
    plan = epoch_plan(101, seed=1, epoch=0, world=2, crop_padding=3)
    shards = [plan.shard(r) for r in range(2)]
    assert len(shards[0].order) == len(shards[1].order) == 51  # padded like DistributedSampler
    assert set(np.concatenate([s.order for s in shards]).tolist()) == set(range(101))
    # One process sees the same samples with the same augmentation draws (first 101 slots).
    single = epoch_plan(101, seed=1, epoch=0, world=1, crop_padding=3)
    assert np.array_equal(single.order, plan.order[:101])
    assert np.array_equal(single.flip, plan.flip[:101])
    with pytest.raises(ValueError):
        plan.shard(2)


def test_batches_per_epoch_follows_lightning_limits() -> None:
    assert batches_per_epoch(1000, 64) == 16
    assert batches_per_epoch(1000, 64, 0.5) == 8
    assert batches_per_epoch(1000, 64, 3) == 3
    assert batches_per_epoch(1000, 64, 99) == 16


def test_metrics_match_torch() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(300, 5)).astype(np.float32)
    labels = rng.integers(0, 4, 300)  # class 4 never occurs in the labels
    got, counts = classification_metrics(logits, labels, 5)
    t_logits, t_labels = torch.from_numpy(logits), torch.from_numpy(labels)
    want_loss = torch.nn.functional.cross_entropy(t_logits, t_labels).item()
    want_f1 = MulticlassF1Score(5, average="macro")(t_logits, t_labels).item()
    assert got["loss"] == pytest.approx(want_loss, abs=1e-6)
    assert got["acc"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert got["f1"] == pytest.approx(want_f1, abs=1e-6)
    assert counts.sum() == 300 and counts[4].sum() == 0


def _fake_checkpoint(path: Path, epoch: int) -> Path:
    staged = path.with_name(f".{path.name}.staged.keras")
    with zipfile.ZipFile(staged, "w") as archive:
        archive.writestr("model.weights.h5", b"weights" * 100 + bytes([epoch]))
    return publish_checkpoint(staged, path, {"epoch": epoch, "config": {}})


def test_checkpoint_has_sha256sum_sidecar_and_state(tmp_path: Path) -> None:
    last = _fake_checkpoint(tmp_path / "last.keras", 2)
    line = (tmp_path / "last.keras.sha256").read_text()
    assert line.endswith("  last.keras\n") and len(line.split()[0]) == 64
    assert read_state(last)["epoch"] == 2
    assert verify_keras_checkpoint(last) is None
    assert not list(tmp_path.glob(".*"))  # nothing staged is left behind


def test_corrupted_checkpoint_falls_back_to_the_newest_good_one(tmp_path: Path) -> None:
    best = _fake_checkpoint(tmp_path / "best.keras", 1)
    last = _fake_checkpoint(tmp_path / "last.keras", 2)
    data = bytearray(last.read_bytes())
    data[10] ^= 0xFF
    last.write_bytes(bytes(data))
    assert "checksum mismatch" in (verify_keras_checkpoint(last) or "")
    with pytest.warns(KerasCheckpointCorruptedWarning, match="previous good checkpoint"):
        assert resolve_keras_checkpoint(last) == best
    best.write_bytes(b"not a zip")
    with pytest.raises(KerasCheckpointError, match="no other good checkpoint"):
        resolve_keras_checkpoint(last)


def test_config_framework_must_match_the_catalogue() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.name=keras_cnn"])
    assert "model.framework='pytorch'" in str(err.value) and "keras_cnn" in str(err.value)
    with pytest.raises(ConfigError, match="simple_cnn"):
        load_config(None, ["model.framework=tensorflow"])
    cfg = load_config(None, ["model.name=keras_cnn", "model.framework=tensorflow"])
    assert cfg.flat_params()["model.framework"] == "tensorflow"


def test_catalogue_lists_keras_models_beside_pytorch_ones() -> None:
    assert list_models("image_classification", framework="tensorflow") == ["keras_cnn"]
    assert list_models("text_classification", framework="tensorflow") == ["keras_text"]
    assert {"keras_cnn", "simple_cnn"} <= set(list_models("image_classification"))
    assert model_framework("keras_text") == "tensorflow"
    with pytest.raises(ValueError, match="TensorFlow process"):
        create_model("keras_cnn", num_classes=10)
    assert "tensorflow" not in sys.modules and "keras" not in sys.modules


class _Splits:
    """The two DataModule methods the parent uses: raw samples of each split."""

    def __init__(self, samples: dict[str, list[tuple[object, int]]]):
        self.samples = samples

    def raw_samples(self, split: str) -> list[tuple[object, int]]:
        return self.samples[split]


def test_splits_reach_the_worker_as_raw_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = {s: [(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), i % 3) for i in range(n)]
              for s, n in (("train", 5), ("val", 2), ("test", 0))}  # fmt: skip
    write_splits(_Splits(images), tmp_path / "img.npz")
    with np.load(tmp_path / "img.npz") as data:
        assert data["train_x"].dtype == np.uint8 and data["train_x"].shape == (5, 28, 28, 1)
        assert np.array_equal(data["train_x"][3], images["train"][3][0])
        assert data["train_y"].tolist() == [0, 1, 2, 0, 1] and len(data["test_y"]) == 0
    texts = {s: [("good film", 1), ("dull — très", 0)] for s in ("train", "val", "test")}
    write_splits(_Splits(texts), tmp_path / "txt.npz")
    with np.load(tmp_path / "txt.npz", allow_pickle=False) as data:  # no pickled objects
        assert data["val_x"].tolist() == ["good film", "dull — très"]
        assert data["val_y"].dtype == np.int64


def test_worker_inputs_are_the_data_preprocessor_outputs(tmp_path: Path) -> None:
    # Design Property 20 for Keras: the worker's training inputs (augmentation drawn as the
    # identity) and its validation inputs are exactly what serving's preprocessing produces.
    rng = np.random.default_rng(1)
    raw = [(rng.integers(0, 256, (28, 28, 1), dtype=np.uint8), i % 10) for i in range(6)]
    write_splits(_Splits({"train": raw, "val": raw, "test": raw}), tmp_path / DATA_FILE)
    cfg = load_config(None, ["model.name=keras_cnn", "model.framework=tensorflow"])
    (tmp_path / JOB_FILE).write_text(
        json.dumps({"config": cfg.model_dump(mode="json"), "world": 1})
    )
    worker = Worker(tmp_path, 0)
    worker.load_data()
    pre = DataPreprocessor(cfg.preprocessing)
    served = pre.preprocess_inference_batch([image for image, _ in raw])
    pad = pre.crop_padding
    identity = EpochPlan(np.arange(6), np.zeros(6, bool), np.full((6, 2), pad), 1)
    assert np.array_equal(worker.epoch_inputs(identity), served)
    assert np.array_equal(worker.inputs["val"], served)
    drawn = epoch_plan(6, seed=3, epoch=0, crop_padding=pad)
    images = np.stack([image for image, _ in raw])[drawn.order]
    want = pre.train_batch(images, params=AugmentParams(drawn.flip, drawn.shift))
    assert np.array_equal(worker.epoch_inputs(drawn), want)
    assert not np.array_equal(want, served[drawn.order])  # the draw did augment
    assert "tensorflow" not in sys.modules
