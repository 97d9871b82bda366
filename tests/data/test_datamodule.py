"""ClassifierDataModule: deterministic splits, limits, loaders, class names, DDP sampler swap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from dlpipe.config import PipelineConfig, config_from_dict
from dlpipe.data import SkippedSamplesWarning, build_datamodule
from dlpipe.data.datasets import ArrayImageDataset

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
TEXT_PRE = {
    "task_type": "text_classification",
    "image_size": None,
    "channels": None,
    "normalization_mean": None,
    "normalization_std": None,
    "tokenizer_name": "minilm",
    "max_sequence_length": 12,
}


def fashion_cfg(path: Path, **data: Any) -> PipelineConfig:
    return config_from_dict(
        {
            "data": {"source": "fashion_mnist", "path": str(path), **data},
            "preprocessing": {"augment": False},
            "training": {"batch_size": 16},
        }
    )


def val_images(cfg: PipelineConfig) -> np.ndarray:
    dm = build_datamodule(cfg)
    dm.setup()
    dataset = dm._datasets()["val"]
    assert isinstance(dataset, ArrayImageDataset)
    return dataset.images


def test_fashion_mnist_splits_are_deterministic_for_a_seed(
    fake_fashion_dir: Path,
) -> None:
    dm = build_datamodule(fashion_cfg(fake_fashion_dir))
    assert dm.split_sizes() == {"train": 108, "val": 12, "test": 40}
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    same = val_images(fashion_cfg(fake_fashion_dir, seed=7))
    np.testing.assert_array_equal(same, val_images(fashion_cfg(fake_fashion_dir, seed=7)))
    assert not np.array_equal(same, val_images(fashion_cfg(fake_fashion_dir, seed=8)))
    # Validation is carved from the training images, never from the official test set.
    train = build_datamodule(fashion_cfg(fake_fashion_dir, seed=7))._datasets()["train"]
    assert isinstance(train, ArrayImageDataset)
    seen = {img.tobytes() for img in train.images}
    assert not any(img.tobytes() in seen for img in same)


def test_limits_cap_the_splits(fake_fashion_dir: Path) -> None:
    cfg = fashion_cfg(fake_fashion_dir, limit_train_samples=50, limit_eval_samples=5)
    assert build_datamodule(cfg).split_sizes() == {"train": 50, "val": 5, "test": 5}


def test_loaders_batch_shapes_and_seeded_shuffle(fake_fashion_dir: Path) -> None:
    dm = build_datamodule(fashion_cfg(fake_fashion_dir))
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    loader = dm.train_dataloader()
    assert sum(len(b[1]) for b in loader) == 108

    def epoch_labels(epoch: int) -> list[int]:
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        return [int(v) for _, ys in loader for v in ys]

    assert epoch_labels(0) == epoch_labels(0)  # the order depends only on (seed, epoch)
    assert epoch_labels(0) != epoch_labels(1)
    again = build_datamodule(fashion_cfg(fake_fashion_dir)).train_dataloader()
    again.sampler.set_epoch(1)  # type: ignore[attr-defined]
    assert [int(v) for _, ys in again for v in ys] == epoch_labels(1)


class _RecordLabels(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(28 * 28, 10)
        self.labels: dict[int, list[int]] = {}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self.labels.setdefault(self.current_epoch, []).extend(y.tolist())
        return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.filterwarnings("ignore:You passed in a `val_dataloader`", "ignore:`isinstance")
def test_lightning_fit_order_depends_only_on_seed_and_epoch(fake_fashion_dir: Path) -> None:
    # What makes a resumed run see the same batches: Lightning calls set_epoch on our sampler.
    model = _RecordLabels()
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=build_datamodule(fashion_cfg(fake_fashion_dir)))
    loader = build_datamodule(fashion_cfg(fake_fashion_dir)).train_dataloader()
    for epoch in (1, 0):  # any order: no hidden state carried between epochs
        loader.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        assert [int(v) for _, ys in loader for v in ys] == model.labels[epoch]


def test_worker_processes_give_the_same_batches(fake_fashion_dir: Path) -> None:
    in_process = build_datamodule(fashion_cfg(fake_fashion_dir)).val_dataloader()
    workers = build_datamodule(fashion_cfg(fake_fashion_dir, num_workers=2)).val_dataloader()
    for (xa, ya), (xb, yb) in zip(in_process, workers, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_augmented_training_batches_follow_the_torch_seed(fake_fashion_dir: Path) -> None:
    cfg = fashion_cfg(fake_fashion_dir)
    cfg.preprocessing.augment = True
    loader = build_datamodule(cfg).train_dataloader()

    def first_batch() -> torch.Tensor:
        torch.manual_seed(0)
        loader.sampler.set_epoch(0)  # type: ignore[attr-defined]
        return next(iter(loader))[0]

    plain = build_datamodule(fashion_cfg(fake_fashion_dir)).train_dataloader()
    plain.sampler.set_epoch(0)  # type: ignore[attr-defined]
    assert torch.equal(first_batch(), first_batch())
    assert not torch.equal(first_batch(), next(iter(plain))[0])


def test_lightning_ddp_sampler_swap_partitions_the_data(fake_fashion_dir: Path) -> None:
    loader = build_datamodule(fashion_cfg(fake_fashion_dir)).train_dataloader()
    seen: list[bytes] = []
    for rank in (0, 1):
        sampler = _get_distributed_sampler(
            loader, shuffle=True, overfit_batches=0, num_replicas=2, rank=rank
        )
        assert type(sampler) is DistributedSampler  # a plain one, not Lightning's wrapper
        ddp_loader = _update_dataloader(loader, sampler)
        seen += [row.numpy().tobytes() for xs, _ in ddp_loader for row in xs]
    everything = [row.numpy().tobytes() for xs, _ in loader for row in xs]
    assert sorted(seen) == sorted(everything)


@pytest.mark.skipif(
    not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_datamodule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLPIPE_DATA_DIR", raising=False)
    cfg = config_from_dict({"preprocessing": {"class_names": [f"c{i}" for i in range(10)]}})
    dm = build_datamodule(cfg)
    assert dm.split_sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert dm.class_names[0] == "c0"
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (128, 1, 28, 28) and abs(float(x.mean())) < 0.3
    assert len(dm.calibration_samples(4)) == 4


def image_folder(root: Path, encode_image: Callable[..., bytes]) -> Path:
    rng = np.random.default_rng(1)
    for name in ("ants", "bees"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)
            (root / name / f"{i}.png").write_bytes(encode_image(pixels))
    (root / "bees" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    return root


def folder_cfg(root: Path, num_classes: int = 2, **pre: Any) -> PipelineConfig:
    return config_from_dict(
        {
            "model": {"num_classes": num_classes, "in_channels": 3},
            "data": {"source": "image_folder", "path": str(root), "seed": 3},
            "preprocessing": {"image_size": [8, 8], "channels": 3, **pre},
            "training": {"batch_size": 4},
        }
    )


def test_image_folder_datamodule_counts_skipped(
    tmp_path: Path, encode_image: Callable[..., bytes]
) -> None:
    root = image_folder(tmp_path / "insects", encode_image)
    dm = build_datamodule(folder_cfg(root))
    with pytest.warns(SkippedSamplesWarning, match="broken.png"):
        dm.setup()
    assert dm.skipped_samples == 1
    assert dm.class_names == ["ants", "bees"]
    assert dm.split_sizes() == {"train": 16, "val": 2, "test": 2}
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1}
    calibration = dm.calibration_samples(3)
    assert len(calibration) == 3 and calibration[0].shape == (8, 8, 3)
    image, label = dm.raw_samples("val", limit=1)[0]
    x_val, y_val = next(iter(dm.val_dataloader()))
    assert label == int(y_val[0])
    expected = dm.preprocessor.preprocess_inference(image)
    assert isinstance(expected, torch.Tensor) and torch.equal(expected, x_val[0])


def test_class_count_mismatches_are_reported(
    tmp_path: Path, encode_image: Callable[..., bytes]
) -> None:
    root = image_folder(tmp_path / "insects", encode_image)
    with (
        pytest.warns(SkippedSamplesWarning),
        pytest.raises(ValueError, match=r"model\.num_classes=3"),
    ):
        build_datamodule(folder_cfg(root, num_classes=3)).setup()
    names = folder_cfg(root, class_names=["only one"])
    with pytest.warns(SkippedSamplesWarning), pytest.raises(ValueError, match="has 1 names"):
        build_datamodule(names).setup()


def text_cfg(path: Path | None, **data: Any) -> PipelineConfig:
    source = {"source": "text_file", "path": str(path)} if path else {"source": "rotten_tomatoes"}
    return config_from_dict(
        {
            "model": {"name": "minilm", "num_classes": 2},
            "data": {**source, **data},
            "preprocessing": TEXT_PRE,
            "training": {"batch_size": 8},
        }
    )


def test_text_file_datamodule(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    rows = [f'"review number {i}",{"good" if i % 3 else "bad"}' for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n,good\n")
    dm = build_datamodule(text_cfg(path))
    with pytest.warns(SkippedSamplesWarning):
        dm.setup()
    assert dm.skipped_samples == 1 and dm.class_names == ["bad", "good"]
    assert dm.split_sizes() == {"train": 32, "val": 4, "test": 4}
    batch, y = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == (8, 12) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].shape == (8, 12) and y.shape == (8,)
    assert all(t.startswith("review number") for t in dm.calibration_samples(5))
    pairs = dm.raw_samples("test")
    assert len(pairs) == 4 and all(isinstance(t, str) and y in (0, 1) for t, y in pairs)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        dm.raw_samples("dev")


def test_too_few_samples_for_the_split(tmp_path: Path) -> None:
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    with pytest.raises(ValueError, match="only 2 usable samples"):
        build_datamodule(text_cfg(path)).setup()


def test_rotten_tomatoes_datamodule_split() -> None:
    dm = build_datamodule(text_cfg(None, limit_train_samples=64))
    assert dm.split_sizes() == {"train": 64, "val": 1281, "test": 1281}
    assert dm.num_classes == 2 and dm.skipped_samples == 0


def test_source_and_task_must_agree(fake_fashion_dir: Path) -> None:
    cfg = text_cfg(None)
    cfg.data.source = "fashion_mnist"
    cfg.data.path = str(fake_fashion_dir)
    with pytest.raises(ValueError, match=r"'fashion_mnist' does not fit preprocessing\.task_type"):
        build_datamodule(cfg).setup()
    images = folder_cfg(fake_fashion_dir)
    images.data.source = "rotten_tomatoes"
    with pytest.raises(ValueError, match="'rotten_tomatoes' does not fit"):
        build_datamodule(images).setup()
