"""torch Datasets over prepared samples, and the collate functions that finish preprocessing.

Per-sample work (decode, convert, resize) happens once, up front or in `__getitem__`; the collate
function then augments and normalizes the whole uint8 batch at once with the same
`DataPreprocessor` code that serving calls. In-memory image sets implement `__getitems__`, so a
DataLoader fetches a batch with one fancy index instead of N Python calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from dlpipe.data.preprocessing import DataPreprocessor


class ImageBatch(NamedTuple):
    """A batch fetched in one go: uint8 N×H×W×C images and int64 labels."""

    images: np.ndarray
    labels: np.ndarray


class ArrayImageDataset(Dataset[tuple[np.ndarray, int]]):
    """Images already prepared (uint8 N×H×W×C at the model's size) and their labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"images {images.shape} and labels {labels.shape} do not match")
        self.images = images
        self.labels = labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: list[int]) -> ImageBatch:
        idx = np.asarray(indices, dtype=np.int64)
        return ImageBatch(self.images[idx], self.labels[idx])


class FileImageDataset(Dataset[tuple[np.ndarray, int]]):
    """Image files decoded on access (for folders too big to keep in memory)."""

    def __init__(self, paths: list[Path], labels: np.ndarray, preprocessor: DataPreprocessor):
        self.paths = paths
        self.labels = labels.astype(np.int64, copy=False)
        self.preprocessor = preprocessor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        path = self.paths[index]
        return self.preprocessor.prepare_image(path.read_bytes()), int(self.labels[index])


class TextDataset(Dataset[tuple[str, int]]):
    """Raw texts and labels; tokenized per batch by `TextCollate`."""

    def __init__(self, texts: list[str], labels: np.ndarray):
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        self.texts = texts
        self.labels = labels.astype(np.int64, copy=False)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], int(self.labels[index])


class ImageCollate:
    """uint8 samples → `(x float32 N×C×H×W, y int64 N)`, augmented when `train` is set."""

    def __init__(self, preprocessor: DataPreprocessor, train: bool):
        self.preprocessor = preprocessor
        self.train = train

    def __call__(self, data: ImageBatch | list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, ...]:
        if isinstance(data, ImageBatch):
            images, labels = data.images, data.labels
        else:
            images = np.stack([image for image, _ in data])
            labels = np.asarray([label for _, label in data], dtype=np.int64)
        pre = self.preprocessor
        # Augmentation draws from torch's RNG: seeded by Lightning, and per DataLoader worker.
        x = pre.train_batch(images) if self.train else pre.normalize(images)
        return torch.from_numpy(x), torch.from_numpy(labels)


class TextCollate:
    """Texts → `({input_ids, attention_mask} int64 N×L, y int64 N)`."""

    def __init__(self, preprocessor: DataPreprocessor):
        self.preprocessor = preprocessor

    def __call__(self, data: list[tuple[str, int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        encoded = self.preprocessor.tokenize([text for text, _ in data])
        labels = torch.tensor([label for _, label in data], dtype=torch.int64)
        return {k: torch.from_numpy(v) for k, v in encoded.items()}, labels


SampleDataset = ArrayImageDataset | FileImageDataset | TextDataset


def subset_dataset(dataset: SampleDataset, indices: np.ndarray) -> SampleDataset:
    """A new dataset of the same kind holding only `indices` (kept cheap: arrays are indexed)."""
    if isinstance(dataset, ArrayImageDataset):
        return ArrayImageDataset(dataset.images[indices], dataset.labels[indices])
    if isinstance(dataset, FileImageDataset):
        paths = [dataset.paths[i] for i in indices]
        return FileImageDataset(paths, dataset.labels[indices], dataset.preprocessor)
    return TextDataset([dataset.texts[i] for i in indices], dataset.labels[indices])
