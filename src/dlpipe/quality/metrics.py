"""Prometheus metrics of model quality, created on the server's own registry.

Counters are per process and summed across the workers of `dlpipe serve --workers N` (exact).
Gauges are computed by every worker from the same windows (each reads the others' log files),
so across workers the most recently written value is the server's (`livemostrecent`).
A version that stops being served loses its series (NaN across processes, where a series
cannot be removed): no alert keeps firing for a version nobody is served by.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge

from dlpipe.quality.live import VersionStats

QUALITY_METRIC_NAMES: tuple[str, ...] = (
    "dlpipe_prediction_log_written_total",
    "dlpipe_prediction_log_dropped_total",
    "dlpipe_feedback_total",
    "dlpipe_online_accuracy",
    "dlpipe_online_class_accuracy",
    "dlpipe_online_labeled",
    "dlpipe_reference_accuracy",
    "dlpipe_drift_score",
    "dlpipe_drift_window",
)
FEEDBACK_OUTCOMES = ("correct", "incorrect", "unknown", "duplicate", "invalid_label")
DROP_REASONS = ("buffer_full", "write_error", "error", "closed")


class QualityMetrics:
    """The quality metrics on `registry` (see docs/monitoring.md for each)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        r = registry

        def gauge(name: str, text: str, labels: tuple[str, ...]) -> Gauge:
            return Gauge(name, text, labels, registry=r, multiprocess_mode="livemostrecent")

        self.log_written = Counter(
            "dlpipe_prediction_log_written", "Records written to the prediction log.", registry=r
        )
        self.log_dropped = Counter(
            "dlpipe_prediction_log_dropped",
            "Records not logged: buffer full, write error, unreadable item, or after shutdown.",
            ("reason",),
            registry=r,
        )
        self.feedback = Counter(
            "dlpipe_feedback",
            "Feedback labels received, by the version that made the prediction and outcome.",
            ("model_version", "outcome"),
            registry=r,
        )
        self.online_accuracy = gauge(
            "dlpipe_online_accuracy",
            "Share of the version's last labeled predictions that were right.",
            ("model_version",),
        )
        self.class_accuracy = gauge(
            "dlpipe_online_class_accuracy",
            "Per true class: share of its labeled predictions that were right (recall).",
            ("model_version", "class"),
        )
        self.labeled = gauge(
            "dlpipe_online_labeled",
            "Labeled predictions in the version's accuracy window.",
            ("model_version",),
        )
        self.reference_accuracy = gauge(
            "dlpipe_reference_accuracy",
            "The version's test-split accuracy at registration (metadata test/acc).",
            ("model_version",),
        )
        self.drift_score = gauge(
            "dlpipe_drift_score",
            "PSI of the version's recent inputs (or predicted classes) against its training "
            "profile; above 0.25 a significant shift.",
            ("model_version", "statistic"),
        )
        self.drift_window = gauge(
            "dlpipe_drift_window",
            "Served inputs in the version's drift window.",
            ("model_version",),
        )
        for reason in DROP_REASONS:
            self.log_dropped.labels(reason)  # zero from the start: rate() sees the first drop
        self._shown: dict[Gauge, set[tuple[str, ...]]] = {}
        self._fresh: set[tuple[Gauge, tuple[str, ...]]] = set()

    def show(
        self,
        version: str,
        stats: VersionStats | None,
        drift: dict[str, float] | None,
        drift_samples: int,
        reference_accuracy: float | None,
    ) -> None:
        """Set one version's gauges for this refresh (`hide_others` then drops the rest)."""
        if stats is not None and stats.accuracy is not None:
            self._set(self.online_accuracy, (version,), stats.accuracy)
            self._set(self.labeled, (version,), stats.labeled)
            for cls, value in stats.class_accuracy.items():
                self._set(self.class_accuracy, (version, cls), value)
        if reference_accuracy is not None:
            self._set(self.reference_accuracy, (version,), reference_accuracy)
        self._set(self.drift_window, (version,), drift_samples)
        for statistic, score in (drift or {}).items():
            self._set(self.drift_score, (version, statistic), score)

    def _set(self, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        gauge.labels(*labels).set(value)
        self._fresh.add((gauge, labels))

    def begin(self) -> None:
        """Start a refresh: series not set again before `hide_others` go away."""
        self._fresh = set()

    def hide_others(self) -> None:
        for gauge in (
            self.online_accuracy,
            self.class_accuracy,
            self.labeled,
            self.reference_accuracy,
            self.drift_score,
            self.drift_window,
        ):
            shown = {labels for g, labels in self._fresh if g is gauge}
            for labels in self._shown.get(gauge, set()) - shown:
                self._hide(gauge, labels)
            self._shown[gauge] = shown

    def _hide(self, gauge: Gauge, labels: Iterable[str]) -> None:
        if self.multiprocess:
            gauge.labels(*labels).set(math.nan)  # files keep every series: NaN is "none"
            return
        with contextlib.suppress(KeyError):
            gauge.remove(*labels)
