"""Per-version live statistics from prediction log records: the public read side of quality.

    stats = LiveStats(window=1000)
    for record in read_records("/var/lib/dlpipe/predictions"):
        stats.ingest(record)
    s = stats.stats("4")            # VersionStats of version 4's last 1000 requests
    s.error_rate, s.latency_quantile(0.95), s.class_counts, s.accuracy

The server keeps one (`QualityMonitor.live`, fed as it answers and from the other workers'
files); `LiveStats.from_log(directory)` builds one in any process from the log alone, so a
canary analysis can compare two versions without asking the server.

Records (one JSON object per line of the log; see docs/monitoring.md):

- `prediction`: `ts`, `request_id`, `model_version`, `status` (200), `latency_ms`,
  `top_k` (`label`, `class_index`, `probability`, most probable first), `input` (summary)
- `error`: `ts`, `request_id`, `model_version`, `status` (5xx or 4xx after routing), `error`
- `feedback`: `ts`, `request_id`, `model_version`, `label`, `predicted`, `correct`
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_VERSIONS = 32
"""Versions kept (the least recently seen go first): a long-running server sees many."""


@dataclass(frozen=True)
class Prediction:
    """What the join index keeps of a logged prediction."""

    model_version: str
    label: str
    class_index: int


@dataclass(frozen=True)
class VersionStats:
    """One version's window: its last `window` requests and last `window` labeled predictions."""

    version: str
    requests: int
    latencies_ms: np.ndarray
    status_counts: dict[int, int]
    class_counts: dict[str, int]
    labeled: int
    correct: int
    class_labeled: dict[str, int] = field(default_factory=dict)
    class_correct: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Server errors (5xx) in the window."""
        return sum(n for status, n in self.status_counts.items() if status >= 500)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def accuracy(self) -> float | None:
        """Share of the labeled predictions that were right (None without labels)."""
        return self.correct / self.labeled if self.labeled else None

    @property
    def class_accuracy(self) -> dict[str, float]:
        """Per true class: share of its labeled predictions that were right (its recall)."""
        return {c: self.class_correct.get(c, 0) / n for c, n in self.class_labeled.items()}

    def latency_quantile(self, q: float) -> float | None:
        if not len(self.latencies_ms):
            return None
        return float(np.quantile(self.latencies_ms, q))


class _Window:
    def __init__(self, size: int) -> None:
        # (ts, latency_ms, status, predicted label or None)
        self.requests: deque[tuple[float, float, int, str | None]] = deque(maxlen=size)
        # (ts, true label, correct)
        self.labels: deque[tuple[float, str, bool]] = deque(maxlen=size)


class LiveStats:
    """Sliding windows per version, and the request id -> prediction join for feedback.

    Thread-safe: the server feeds it from its writer and follower threads and reads it from
    the event loop.

    Args:
        window: requests (and labeled predictions) kept per version.
        index_size: predictions remembered for joining feedback (the oldest are forgotten).
    """

    def __init__(self, window: int = 1000, index_size: int = 200_000) -> None:
        self.window = window
        self.index_size = index_size
        self._lock = threading.Lock()
        self._versions: OrderedDict[str, _Window] = OrderedDict()
        # Plain tuples of strings and ints: the garbage collector stops tracking them, so a
        # full collection does not walk 200,000 remembered predictions (a latency spike).
        self._index: OrderedDict[str, tuple[str, str, int]] = OrderedDict()
        self._labeled: OrderedDict[str, None] = OrderedDict()

    @classmethod
    def from_log(
        cls, directory: str | Path, window: int = 1000, since: float | None = None
    ) -> LiveStats:
        """Windows built from every record of a log directory (`since`: unix time)."""
        from dlpipe.quality.predlog import read_records

        stats = cls(window)
        stats.ingest_many(r for r in read_records(directory) if since is None or r["ts"] >= since)
        return stats

    # ------------------------------------------------------------------ writing
    def ingest(self, record: dict[str, Any]) -> None:
        self.ingest_many((record,))

    def ingest_many(self, records: Iterable[dict[str, Any]]) -> None:
        with self._lock:
            for r in records:
                kind = r.get("type")
                if kind == "prediction":
                    self._add_prediction(r)
                elif kind == "error":
                    self._requests(r["model_version"]).append(
                        (r["ts"], r.get("latency_ms", 0.0), int(r["status"]), None)
                    )
                elif kind == "feedback":
                    self._add_feedback(r)

    def _requests(self, version: str) -> deque[tuple[float, float, int, str | None]]:
        return self._version(version).requests

    def _version(self, version: str) -> _Window:
        w = self._versions.get(version)
        if w is None:
            w = self._versions[version] = _Window(self.window)
            if len(self._versions) > MAX_VERSIONS:
                self._versions.popitem(last=False)
        else:
            self._versions.move_to_end(version)
        return w

    def _add_prediction(self, r: dict[str, Any]) -> None:
        top = r["top_k"][0]
        version = r["model_version"]
        self._requests(version).append((r["ts"], r["latency_ms"], int(r["status"]), top["label"]))
        self._index[r["request_id"]] = (version, top["label"], int(top["class_index"]))
        if len(self._index) > self.index_size:
            self._index.popitem(last=False)

    def _add_feedback(self, r: dict[str, Any]) -> None:
        rid = r["request_id"]
        if rid in self._labeled:
            return  # replayed twice (a restart re-reads the tail of the log)
        self._labeled[rid] = None
        if len(self._labeled) > self.index_size:
            self._labeled.popitem(last=False)
        w = self._version(r["model_version"])
        w.labels.append((r["ts"], str(r["label"]), bool(r["correct"])))

    # ------------------------------------------------------------------ reading
    def lookup(self, request_id: str) -> Prediction | None:
        """The logged prediction of `request_id` (None: unknown or forgotten)."""
        with self._lock:
            entry = self._index.get(request_id)
        return None if entry is None else Prediction(*entry)

    def is_labeled(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._labeled

    def versions(self) -> list[str]:
        with self._lock:
            return list(self._versions)

    def stats(self, version: str, since: float | None = None) -> VersionStats:
        """The version's window (only what happened at or after `since`, unix time, if given)."""
        with self._lock:
            w = self._versions.get(version)
            requests = list(w.requests) if w else []
            labels = list(w.labels) if w else []
        if since is not None:
            requests = [r for r in requests if r[0] >= since]
            labels = [lab for lab in labels if lab[0] >= since]
        status: dict[int, int] = {}
        classes: dict[str, int] = {}
        for _, _, code, label in requests:
            status[code] = status.get(code, 0) + 1
            if label is not None:
                classes[label] = classes.get(label, 0) + 1
        class_labeled: dict[str, int] = {}
        class_correct: dict[str, int] = {}
        for _, label, correct in labels:
            class_labeled[label] = class_labeled.get(label, 0) + 1
            class_correct[label] = class_correct.get(label, 0) + int(correct)
        return VersionStats(
            version=version,
            requests=len(requests),
            latencies_ms=np.array([r[1] for r in requests], dtype=np.float64),
            status_counts=status,
            class_counts=classes,
            labeled=len(labels),
            correct=sum(class_correct.values()),
            class_labeled=class_labeled,
            class_correct=class_correct,
        )
