"""Accuracy of an original and an optimized model on the same held-out batches, and the gate.

    report = validate_accuracy(net, "model.int8.onnx", datamodule.test_dataloader())
    check_accuracy_gate(report, max_accuracy_drop=0.01)   # raises AccuracyDegradationError

Models may be PyTorch modules, ONNX Runtime sessions or paths to .onnx files. Batches are
`(x, y)` with `x` a tensor (images) or a dict of `input_ids`/`attention_mask` (text).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlpipe.optimize.onnx_export import make_session

ModelLike = nn.Module | str | Path | Any  # Any: an onnxruntime.InferenceSession


class AccuracyDegradationError(RuntimeError):
    """An optimized variant lost more accuracy than allowed; it must not be registered."""

    def __init__(self, report: AccuracyReport, max_drop: float):
        self.report = report
        self.max_drop = max_drop
        super().__init__(
            f"refused: accuracy dropped {report.drop * 100:.2f} points "
            f"({report.original_accuracy:.4f} -> {report.optimized_accuracy:.4f}), "
            f"allowed {max_drop * 100:.2f}"
        )


@dataclass
class AccuracyReport:
    """Both accuracies on the same samples; `drop` = original - optimized (fraction, not %)."""

    original_accuracy: float
    optimized_accuracy: float
    num_samples: int
    agreement: float
    """Fraction of samples where both models predict the same class."""

    @property
    def drop(self) -> float:
        return self.original_accuracy - self.optimized_accuracy

    def to_dict(self) -> dict[str, float]:
        out = asdict(self)
        out["drop"] = self.drop
        return out


def _as_predictor(model: ModelLike) -> Any:
    if isinstance(model, nn.Module):
        model.eval()
        return model
    if isinstance(model, str | Path):
        return make_session(model)
    if hasattr(model, "run") and hasattr(model, "get_inputs"):
        return model
    raise TypeError(f"expected nn.Module, ONNX path or InferenceSession, got {type(model)}")


def predict_logits(model: Any, x: torch.Tensor | dict[str, torch.Tensor]) -> np.ndarray:
    """Logits of a module or ORT session for one batch."""
    if isinstance(model, nn.Module):
        with torch.inference_mode():
            out = model(**x) if isinstance(x, dict) else model(x)
        return out.float().cpu().numpy()
    names = [i.name for i in model.get_inputs()]
    if isinstance(x, dict):
        missing = [n for n in names if n not in x]
        if missing:
            raise ValueError(f"batch lacks ONNX inputs {missing}; it has {sorted(x)}")
        feeds = {n: x[n].cpu().numpy() for n in names}
    else:
        if len(names) != 1:
            raise ValueError(f"ONNX model has inputs {names} but the batch is one tensor")
        feeds = {names[0]: x.cpu().numpy()}
    return np.asarray(model.run(None, feeds)[0], dtype=np.float32)


def predictions(model: ModelLike, batches: Iterable[Any]) -> np.ndarray:
    """Predicted class of every sample, in batch order."""
    predictor = _as_predictor(model)
    return np.concatenate([predict_logits(predictor, x).argmax(axis=1) for x, _ in batches])


def _labels(batches: list[Any]) -> np.ndarray:
    labels = np.concatenate([np.asarray(y) for _, y in batches]) if batches else np.array([])
    if labels.size == 0:
        raise ValueError("test_loader yielded no samples")
    return labels


def evaluate_accuracy(model: ModelLike, test_loader: Iterable[Any]) -> float:
    """Top-1 accuracy of one model."""
    batches = list(test_loader)
    labels = _labels(batches)
    return float((predictions(model, batches) == labels).mean())


def validate_accuracy(
    original: ModelLike,
    optimized: ModelLike,
    test_loader: Iterable[Any],
    original_predictions: np.ndarray | None = None,
) -> AccuracyReport:
    """Compare top-1 accuracy of two models on the same batches.

    Args:
        original_predictions: the original's predictions on these batches, when already known
            (several variants are compared against one original); `original` is then not run.
    """
    batches = list(test_loader)
    labels = _labels(batches)
    if original_predictions is None:
        original_predictions = predictions(original, batches)
    if len(original_predictions) != len(labels):
        raise ValueError(
            f"{len(original_predictions)} original predictions for {len(labels)} samples"
        )
    optimized_pred = predictions(optimized, batches)
    return AccuracyReport(
        original_accuracy=float((original_predictions == labels).mean()),
        optimized_accuracy=float((optimized_pred == labels).mean()),
        num_samples=int(labels.size),
        agreement=float((original_predictions == optimized_pred).mean()),
    )


def passes_accuracy_gate(report: AccuracyReport, max_accuracy_drop: float) -> bool:
    """True when the optimized model lost at most `max_accuracy_drop` (a fraction, 0.01 = 1 pt)."""
    # A tiny epsilon so that a drop of exactly the allowed amount is not refused by float noise.
    return report.drop <= max_accuracy_drop + 1e-9


def check_accuracy_gate(report: AccuracyReport, max_accuracy_drop: float) -> None:
    """Raise `AccuracyDegradationError` when the drop exceeds `max_accuracy_drop`."""
    if max_accuracy_drop < 0:
        raise ValueError(f"max_accuracy_drop must be >= 0, got {max_accuracy_drop}")
    if not passes_accuracy_gate(report, max_accuracy_drop):
        raise AccuracyDegradationError(report, max_accuracy_drop)
