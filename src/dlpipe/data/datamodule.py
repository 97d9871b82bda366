"""`build_datamodule(cfg)`: a LightningDataModule for any configured source.

    dm = build_datamodule(load_config("configs/fashion_mnist.yaml"))
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))   # float32 128×1×28×28, int64 128

Splits are deterministic for `data.seed`. Fashion-MNIST carves validation out of its 60k training
images and tests on the official 10k; the other sources split train/val/test by fraction.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from dlpipe.config import PipelineConfig
from dlpipe.data import sources
from dlpipe.data.datasets import (
    ArrayImageDataset,
    FileImageDataset,
    ImageCollate,
    SampleDataset,
    TextCollate,
    TextDataset,
    subset_dataset,
)
from dlpipe.data.preprocessing import DataPreprocessor

TEXT_SOURCES = ("rotten_tomatoes", "text_file")


class EpochShuffleSampler(RandomSampler):
    """A RandomSampler whose order depends only on (seed, epoch).

    Lightning calls `set_epoch` before each epoch, so a resumed run sees the same order as an
    uninterrupted one; plain loops get a new order per pass. Being a `RandomSampler`, Lightning
    swaps it for a `DistributedSampler` under DDP, as usual.
    """

    def __init__(self, data_source: Any, seed: int):
        super().__init__(data_source, generator=torch.Generator())
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        assert self.generator is not None
        self.generator.manual_seed(self.seed + self.epoch)
        self.epoch += 1
        return super().__iter__()


class ClassifierDataModule(L.LightningDataModule):
    """Train/val/test DataLoaders, class names and skip counts for one `PipelineConfig`."""

    def __init__(self, cfg: PipelineConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = DataPreprocessor(cfg.preprocessing)
        self.skipped_samples = 0
        self._splits: dict[str, SampleDataset] | None = None
        self._class_names: list[str] = []

    # -- LightningDataModule hooks ---------------------------------------------------------

    def prepare_data(self) -> None:
        """Download Fashion-MNIST once (local rank 0) when no local copy exists."""
        data = self.cfg.data
        if data.source == "fashion_mnist" and sources.find_fashion_mnist(data.path) is None:
            sources.download_fashion_mnist()

    def setup(self, stage: str | None = None) -> None:
        """Load and split the data (once; later calls are free)."""
        if self._splits is None:
            self._splits = self._load_splits()

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", train=False)

    # -- what other packages read ----------------------------------------------------------

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        self.setup()
        return list(self._class_names)

    def split_sizes(self) -> dict[str, int]:
        """Number of samples in each split."""
        return {name: len(ds) for name, ds in self._datasets().items()}

    def calibration_samples(self, n: int) -> list[Any]:
        """The first `n` raw training samples (uint8 H×W×C images or texts), for calibration."""
        return [sample for sample, _ in self.raw_samples("train", n)]

    def raw_samples(self, split: str, limit: int | None = None) -> list[tuple[Any, int]]:
        """`(raw sample, label)` pairs of a split, in order: uint8 H×W×C images or texts."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"unknown split {split!r}; allowed: train, val, test")
        dataset = self._datasets()[split]
        count = len(dataset) if limit is None else min(limit, len(dataset))
        return [dataset[i] for i in range(count)]

    # -- internals -------------------------------------------------------------------------

    def _datasets(self) -> dict[str, SampleDataset]:
        self.setup()
        assert self._splits is not None
        return self._splits

    def _loader(self, split: str, train: bool) -> DataLoader[Any]:
        dataset = self._datasets()[split]
        collate: Any = (
            TextCollate(self.preprocessor)
            if self.preprocessor.is_text
            else ImageCollate(self.preprocessor, train=train)
        )
        workers = self.cfg.data.num_workers
        if workers and self.preprocessor.is_text:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no threads before fork
        seed = self.cfg.data.seed
        return DataLoader(
            dataset,
            batch_size=self.cfg.training.batch_size,
            sampler=EpochShuffleSampler(dataset, seed) if train else None,
            num_workers=workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(seed),  # worker seeds for augmentation
            persistent_workers=workers > 0,
            pin_memory=self.cfg.training.num_gpus > 0,  # faster host-to-GPU copies
        )

    def _load_splits(self) -> dict[str, SampleDataset]:
        data = self.cfg.data
        task = self.cfg.preprocessing.task_type
        if (data.source in TEXT_SOURCES) != (task == "text_classification"):
            raise ValueError(
                f"data.source {data.source!r} does not fit preprocessing.task_type {task!r}"
            )
        rng = np.random.default_rng(data.seed)
        if data.source == "fashion_mnist":
            arrays = sources.load_fashion_mnist(data.path)
            train_all: SampleDataset = ArrayImageDataset(
                self._prepare_array(arrays["train"].images), arrays["train"].labels
            )
            test: SampleDataset = ArrayImageDataset(
                self._prepare_array(arrays["test"].images), arrays["test"].labels
            )
            order = rng.permutation(len(train_all))
            n_val = max(1, round(len(order) * data.val_fraction))
            parts = {"train": order[n_val:], "val": order[:n_val]}
            test_order = np.sort(rng.permutation(len(test))[: data.limit_eval_samples])
            discovered = [str(i) for i in range(10)]
        else:
            samples = self._load_samples()
            self.skipped_samples = samples.skipped
            train_all = self._dataset_for(samples)
            order = rng.permutation(len(train_all))
            n_test = max(1, round(len(order) * data.test_fraction))
            n_val = max(1, round(len(order) * data.val_fraction))
            if len(order) - n_test - n_val < 1:
                raise ValueError(
                    f"data source {data.source!r} has only {len(order)} usable samples: too few "
                    f"for val_fraction={data.val_fraction} and test_fraction={data.test_fraction}"
                )
            parts = {
                "test": order[:n_test],
                "val": order[n_test : n_test + n_val],
                "train": order[n_test + n_val :],
            }
            test = subset_dataset(train_all, np.sort(parts.pop("test")[: data.limit_eval_samples]))
            test_order = None
            discovered = samples.class_names
        self._class_names = self._resolve_class_names(discovered)
        out = {
            "train": subset_dataset(train_all, parts["train"][: data.limit_train_samples]),
            "val": subset_dataset(train_all, np.sort(parts["val"][: data.limit_eval_samples])),
            "test": test if test_order is None else subset_dataset(test, test_order),
        }
        return out

    def _load_samples(self) -> sources.LabeledSamples:
        data, pre = self.cfg.data, self.cfg.preprocessing
        if data.source == "image_folder":
            assert data.path is not None
            return sources.load_image_folder(data.path, self.preprocessor)
        if data.source == "rotten_tomatoes":
            return sources.load_rotten_tomatoes()
        assert data.path is not None
        return sources.load_text_file(
            data.path, data.text_column, data.label_column, pre.class_names
        )

    def _dataset_for(self, samples: sources.LabeledSamples) -> SampleDataset:
        if self.cfg.data.source in TEXT_SOURCES:
            return TextDataset(samples.samples, samples.labels)
        if samples.samples and isinstance(samples.samples[0], np.ndarray):
            return ArrayImageDataset(np.stack(samples.samples), samples.labels)
        return FileImageDataset(samples.samples, samples.labels, self.preprocessor)

    def _prepare_array(self, images: np.ndarray) -> np.ndarray:
        """uint8 N×H×W(×C) → N×H×W×C at the configured size and channels (same code as serving)."""
        pre = self.preprocessor
        stacked = images[..., None] if images.ndim == 3 else images
        if stacked.shape[1:] == (pre.height, pre.width, pre.channels):
            return stacked  # nothing to convert: no per-image work, no copy
        out = np.empty((len(images), pre.height, pre.width, pre.channels), dtype=np.uint8)
        for i, image in enumerate(images):
            out[i] = pre.prepare_image(image)
        return out

    def _resolve_class_names(self, discovered: list[str]) -> list[str]:
        names = self.cfg.preprocessing.class_names or discovered
        if len(names) != len(discovered):
            raise ValueError(
                f"preprocessing.class_names has {len(names)} names but the data has "
                f"{len(discovered)} classes ({', '.join(discovered)})"
            )
        if len(names) != self.cfg.model.num_classes:
            raise ValueError(
                f"the data has {len(names)} classes ({', '.join(names)}) but "
                f"model.num_classes={self.cfg.model.num_classes}"
            )
        return list(names)


def build_datamodule(cfg: PipelineConfig) -> ClassifierDataModule:
    """The DataModule for `cfg.data` with `cfg.preprocessing` (data loads on `setup()`)."""
    return ClassifierDataModule(cfg)
