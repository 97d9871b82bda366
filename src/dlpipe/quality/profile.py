"""Building a version's drift profile at registration (training side of `dlpipe.quality.drift`).

    profile = profile_from_datamodule(datamodule, confusion)    # in training, after testing
    profile.save(package_dir)                                   # -> drift_profile.json

The inputs are summarized with the training `DataPreprocessor`, the very code the server's
decoder runs, so a served copy of a training input has the same statistics as in the profile.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.quality.drift import PROFILE_FILE, DriftProfile, StatisticReference
from dlpipe.quality.summary import coverage_table, image_statistics, text_statistics

log = logging.getLogger(__name__)
PROFILE_SAMPLES = 5000
"""Inputs summarized for a profile (more only sharpens the deciles)."""
_CHUNK = 512


def _pixels(sample: Any) -> int:
    shape = np.shape(sample)
    if len(shape) >= 2:
        return int(shape[0] * shape[1])  # H x W (x C) as the sources hold them
    width, height = sample.size  # a PIL image
    return int(width * height)


def build_profile(
    preprocessor: Any,
    inputs: list[Any],
    *,
    predicted_counts: np.ndarray | list[int] | None = None,
    vocabulary_texts: list[str] | None = None,
    with_pixels: bool = True,
    source: str = "",
) -> DriftProfile:
    """A profile of raw `inputs` (uint8 H x W [x C] images, PIL images or texts).

    Args:
        preprocessor: the version's `dlpipe.data.DataPreprocessor`.
        predicted_counts: how often the model predicted each class on held-out data.
        vocabulary_texts: texts whose token ids make the vocabulary (text models; default
            `inputs`). Use the training split while `inputs` are held out: coverage measured
            on the texts the vocabulary came from would be 1 by construction.
        with_pixels: record the uploaded size (False when `inputs` were already resized).
    """
    if not inputs:
        raise ValueError("a drift profile needs at least one input")
    columns: dict[str, list[np.ndarray]] = {}
    vocabulary = None
    if preprocessor.is_text:
        ids: set[int] = set()
        for i in range(0, len(vocabulary_texts or inputs), _CHUNK):
            batch = preprocessor.tokenize((vocabulary_texts or inputs)[i : i + _CHUNK])
            ids.update(np.unique(batch["input_ids"][batch["attention_mask"].astype(bool)]))
        vocabulary = sorted(int(t) for t in ids)
        table = coverage_table(vocabulary)
    for i in range(0, len(inputs), _CHUNK):
        chunk = inputs[i : i + _CHUNK]
        if preprocessor.is_text:
            batch = preprocessor.tokenize(chunk)
            stats = text_statistics(batch["input_ids"], batch["attention_mask"], table)
        else:
            tensors = preprocessor.preprocess_inference_batch(chunk)
            stats = image_statistics(tensors, [_pixels(s) for s in chunk])
            if not with_pixels:
                stats.pop("pixels")
        for name, values in stats.items():
            columns.setdefault(name, []).append(values)
    # Rounded as the server rounds what it logs, so a served training input bins identically.
    references = {
        name: StatisticReference.of(np.round(np.concatenate(parts), 5))
        for name, parts in columns.items()
    }
    classes = None if predicted_counts is None else [int(c) for c in predicted_counts]
    return DriftProfile(references, classes, vocabulary, len(inputs), source)


def profile_from_datamodule(
    datamodule: Any, confusion: np.ndarray | None = None, limit: int = PROFILE_SAMPLES
) -> DriftProfile | None:
    """The profile of a dlpipe DataModule: inputs from the validation split (training data held
    out from fitting), the vocabulary from the training split, and the predicted class counts
    from the test confusion matrix (rows true, columns predicted). None for a DataModule
    without raw samples."""
    if not hasattr(datamodule, "raw_samples") or not hasattr(datamodule, "preprocessor"):
        return None
    split = "val" if datamodule.raw_samples("val", 1) else "train"
    inputs = [sample for sample, _ in datamodule.raw_samples(split, limit)]
    pre = datamodule.preprocessor
    texts = [t for t, _ in datamodule.raw_samples("train")] if pre.is_text else None
    # Array sources (Fashion-MNIST) hold images as they come; folders are resized when read,
    # so their stored size says nothing about what clients upload.
    source = getattr(getattr(datamodule, "cfg", None), "data", None)
    as_uploaded = getattr(source, "source", "") == "fashion_mnist"
    predicted = None if confusion is None else np.asarray(confusion).sum(axis=0)
    return build_profile(
        pre,
        inputs,
        predicted_counts=predicted,
        vocabulary_texts=texts,
        with_pixels=as_uploaded,
        source=f"{split} split, {len(inputs)} inputs",
    )


def save_training_profile(
    package_dir: str | Path, datamodule: Any, confusion: np.ndarray | None
) -> Path | None:
    """Write the DataModule's profile into a package; a failure is logged, never raised (a
    version without a profile serves, just without drift scores)."""
    try:
        profile = profile_from_datamodule(datamodule, confusion)
        return None if profile is None else profile.save(package_dir)
    except Exception:
        log.warning("no drift profile for %s", package_dir, exc_info=True)
        return None


def inherit_profile(parent_dir: str | Path, package_dir: str | Path) -> bool:
    """Copy the parent version's profile into a derived package (an ONNX or quantized variant
    takes the same inputs); False when the parent has none."""
    src = Path(parent_dir) / PROFILE_FILE
    if not src.is_file():
        return False
    shutil.copyfile(src, Path(package_dir) / PROFILE_FILE)
    return True
