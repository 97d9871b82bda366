"""Feedback: a ground-truth label joined to the prediction the log holds for its id, and the
online accuracy that results, as MLflow model-version tags.

A label counts once, in the accuracy window of the version that made the prediction: a second
label for the same id is a `duplicate` (the first one stands), a label that is not one of the
version's classes is refused (`invalid_label`), an id the log does not hold is `unknown`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from dlpipe.quality.live import LiveStats, VersionStats


@dataclass(frozen=True)
class FeedbackResult:
    request_id: str
    outcome: str
    """`correct`, `incorrect`, `unknown` (no logged prediction with this id: never made, not
    sampled, or forgotten), `duplicate` (already labeled) or `invalid_label`."""
    model_version: str | None = None
    predicted: str | None = None


def judge(
    live: LiveStats, class_names: list[str] | None, request_id: str, label: str | int
) -> tuple[FeedbackResult, dict[str, Any] | None]:
    """The outcome of one label, and the feedback record to keep when it counts.

    `label`: a class name, or a class index (named through `class_names` when known).
    """
    prediction = live.lookup(request_id)
    if prediction is None:
        return FeedbackResult(request_id, "unknown"), None
    version, predicted = prediction.model_version, prediction.label
    if live.is_labeled(request_id):
        return FeedbackResult(request_id, "duplicate", version, predicted), None
    names = class_names or []
    if isinstance(label, int):
        if label < 0 or (names and label >= len(names)):
            return FeedbackResult(request_id, "invalid_label", version, predicted), None
        label = names[label] if names else str(label)
    elif names and label not in names:
        return FeedbackResult(request_id, "invalid_label", version, predicted), None
    correct = label == predicted
    record = {
        "type": "feedback",
        "ts": time.time(),
        "request_id": request_id,
        "model_version": version,
        "label": label,
        "predicted": predicted,
        "correct": correct,
    }
    outcome = "correct" if correct else "incorrect"
    return FeedbackResult(request_id, outcome, version, predicted), record


def tags_key(stats: VersionStats) -> tuple[int, int]:
    """What must change before the tags are written again."""
    return (stats.labeled, stats.correct)


def accuracy_tags(stats: VersionStats, window: int) -> dict[str, str]:
    """The MLflow model-version tags of a version's online accuracy, in the order to set them:
    `dlpipe.online_accuracy` last, so a reader that sees it change sees the others with it."""
    return {
        "dlpipe.online_accuracy_labeled": str(stats.labeled),
        "dlpipe.online_accuracy_window": str(window),
        "dlpipe.online_class_accuracy": json.dumps(
            {c: round(v, 6) for c, v in sorted(stats.class_accuracy.items())}
        ),
        "dlpipe.online_accuracy_updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dlpipe.online_accuracy": f"{stats.accuracy:.6f}",
    }
