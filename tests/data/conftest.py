"""Fixtures for data tests: small files written on the fly (PNG bytes, IDX files, folders)."""

from __future__ import annotations

import gzip
import io
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dlpipe.config import PreprocessingConfig
from dlpipe.data import DataPreprocessor

sys.path.insert(0, str(Path(__file__).parent))  # text_helpers, as tests/serving does


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def _write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    data = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture(scope="session")
def encode_image() -> Callable[..., bytes]:
    """`encode_image(uint8 array, fmt="PNG") -> bytes`."""
    return _encode


@pytest.fixture(scope="session")
def write_idx() -> Callable[..., Path]:
    """`write_idx(path, array, compress=False) -> path`: an IDX file as Fashion-MNIST ships it."""
    return _write_idx


@pytest.fixture(scope="session")
def gray_preprocessor() -> DataPreprocessor:
    return DataPreprocessor(
        PreprocessingConfig(
            image_size=(8, 8), channels=1, normalization_mean=[0.5], normalization_std=[0.5]
        )
    )


@pytest.fixture(scope="session")
def text_preprocessor() -> DataPreprocessor:
    return DataPreprocessor(
        PreprocessingConfig(
            task_type="text_classification",
            image_size=None,
            channels=None,
            normalization_mean=None,
            normalization_std=None,
            tokenizer_name="minilm",
            max_sequence_length=16,
        )
    )


def write_fake_fashion_mnist(
    directory: Path, n_train: int = 120, n_test: int = 40, compress: bool = True
) -> Path:
    """Four IDX files with random 28×28 images; labels cycle through 0..9."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        _write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return directory


@pytest.fixture(scope="session")
def fake_fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_fashion_mnist(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="session")
def make_fashion_dir() -> Callable[..., Path]:
    """`make_fashion_dir(directory, n_train=120, n_test=40, compress=True) -> directory`."""
    return write_fake_fashion_mnist
