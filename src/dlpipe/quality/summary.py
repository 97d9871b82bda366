"""Compact summaries of model inputs: the statistics drift is measured on.

One definition serves both sides: the reference profile applies `image_statistics` /
`text_statistics` to a batch of training inputs, the server applies `summarize` to each served
input, and the two agree value for value (tested), so a difference in their distributions is
a difference in the data, not in the arithmetic.

Images are summarized as the model sees them (after `DataPreprocessor`: resized, normalized),
plus the uploaded size: an inverted, darker or differently-sized image moves one of them.

    mean_intensity  mean of the model input (normalized pixel values)
    contrast        standard deviation of the model input
    pixels          width x height of the image as uploaded (before resizing)

Texts:

    tokens          tokens the model attends to (the attention mask's sum; capped by truncation)
    vocab_coverage  share of those tokens whose id occurs in the training texts (needs the
                    profile's vocabulary; special tokens count, as they do on both sides)
"""

from __future__ import annotations

from typing import Any

import numpy as np

IMAGE_STATISTICS = ("mean_intensity", "contrast", "pixels")
TEXT_STATISTICS = ("tokens", "vocab_coverage")
_COUNTS = frozenset({"pixels", "tokens"})
_STACK_BELOW = 16_384
"""Images with fewer values are stacked and summarized in one numpy call (the per-call overhead
dominates); larger ones one at a time, without copying them into a stack first."""

CLASS_STATISTIC = "predicted_class"
"""The drift statistic of the predicted class distribution (categorical)."""


def image_statistics(batch: np.ndarray, pixels: np.ndarray | list[int]) -> dict[str, np.ndarray]:
    """Statistics of N preprocessed images (float32 N x C x H x W) and their uploaded sizes."""
    flat = np.asarray(batch).reshape(len(batch), -1)
    m = flat.shape[1]
    # Two passes (sum, sum of squares), each row on its own: a row's statistics do not depend
    # on what it is batched with, so the server and the profile agree value for value.
    mean = flat.sum(axis=1).astype(np.float64) / m
    square = np.einsum("ij,ij->i", flat, flat).astype(np.float64) / m
    return {
        "mean_intensity": mean,
        "contrast": np.sqrt(np.maximum(square - mean * mean, 0.0)),
        "pixels": np.asarray(pixels, dtype=np.float64),
    }


def coverage_table(vocabulary: list[int] | np.ndarray, size: int | None = None) -> np.ndarray:
    """A boolean lookup table: `table[token_id]` is True for ids in `vocabulary`."""
    ids = np.asarray(vocabulary, dtype=np.int64)
    table = np.zeros(max(int(size or 0), int(ids.max(initial=-1)) + 1, 1), dtype=bool)
    table[ids] = True
    return table


def _coverage(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Per-token membership; ids beyond the table were never seen in training."""
    inside = ids < len(table)
    hit = np.zeros(ids.shape, dtype=bool)
    hit[inside] = table[ids[inside]]
    return hit


def text_statistics(
    input_ids: np.ndarray, attention_mask: np.ndarray, table: np.ndarray | None
) -> dict[str, np.ndarray]:
    """Statistics of N tokenized texts (int64 N x L); coverage only with a vocabulary table."""
    mask = np.asarray(attention_mask).astype(bool)
    tokens = mask.sum(axis=1)
    out = {"tokens": tokens.astype(np.float64)}
    if table is not None:
        hits = _coverage(np.asarray(input_ids), table) & mask
        out["vocab_coverage"] = hits.sum(axis=1) / np.maximum(tokens, 1)
    return out


def summarize(sample: Any, pixels: int | None, table: np.ndarray | None) -> dict[str, float]:
    """The statistics of one served model input (an image array or a dict of token arrays).

    `pixels`: the uploaded image's width x height (None: the tensor's own H x W, as for a
    tensor sent to /v2). Rounded: these go into every log line.
    """
    return summarize_many([(sample, pixels, table)])[0]


def summarize_many(
    inputs: list[tuple[Any, int | None, np.ndarray | None]],
) -> list[dict[str, float]]:
    """`summarize` for many inputs at once: inputs of one shape (and vocabulary) are stacked
    and summarized in one numpy call, a few microseconds each instead of tens."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, (sample, _, table) in enumerate(inputs):
        if isinstance(sample, dict):
            key: tuple[Any, ...] = ("text", np.shape(sample["input_ids"]), id(table))
        else:
            key = ("image", np.shape(sample))
        groups.setdefault(key, []).append(i)
    out: list[dict[str, float]] = [{} for _ in inputs]
    for key, members in groups.items():
        if key[0] == "text":
            table = inputs[members[0]][2]
            ids = np.stack([inputs[i][0]["input_ids"] for i in members])
            mask = np.stack([inputs[i][0]["attention_mask"] for i in members])
            stats = text_statistics(ids, mask, table)
        else:
            shape = np.shape(inputs[members[0]][0])
            h, w = shape[-2:]
            sizes = [int(inputs[i][1] or h * w) for i in members]
            flat = [np.asarray(inputs[i][0]).reshape(1, -1) for i in members]
            if flat[0].shape[1] >= _STACK_BELOW:  # one call each: no copy of large images
                parts = [image_statistics(row, [n]) for row, n in zip(flat, sizes, strict=True)]
                stats = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            else:  # concatenate + reshape: a third of np.stack's cost per sample
                batch = np.concatenate(flat).reshape(len(members), *shape)
                stats = image_statistics(batch, sizes)
        columns = {
            name: values.astype(np.int64).tolist()
            if name in _COUNTS
            else np.round(values, 5).tolist()
            for name, values in stats.items()
        }
        for row, i in enumerate(members):
            out[i] = {name: column[row] for name, column in columns.items()}
    return out
