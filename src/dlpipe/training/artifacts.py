"""Run artifacts written after training: confusion-matrix PNG and model summary text."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch


def save_confusion_matrix_png(
    matrix: torch.Tensor | np.ndarray, class_names: list[str], path: str | Path
) -> Path:
    """Plot a confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")  # no display in training jobs
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix.cpu() if isinstance(matrix, torch.Tensor) else matrix, dtype=int)
    k = counts.shape[0]
    names = class_names if len(class_names) == k else [str(i) for i in range(k)]
    size = max(4.0, 0.6 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test confusion matrix (accuracy {np.trace(counts) / max(1, counts.sum()):.4f})")
    threshold = counts.max() / 2 if counts.size else 0
    for i in range(k):
        for j in range(k):
            color = "white" if counts[i, j] > threshold else "black"
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def save_model_summary(model: pl.LightningModule, path: str | Path) -> Path:
    """Layer table, parameter counts and the network's repr, as plain text."""
    from lightning.pytorch.utilities.model_summary import ModelSummary

    summary = ModelSummary(model, max_depth=3)
    out = Path(path)
    net = getattr(model, "net", model)
    out.write_text(f"{summary}\n\n{net}\n")
    return out
