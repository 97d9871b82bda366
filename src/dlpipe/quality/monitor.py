"""`QualityMonitor`: what the server runs for model quality (log, online accuracy, drift).

    monitor = QualityMonitor(registry, log_dir="/var/lib/dlpipe/predictions")
    monitor.start()
    monitor.observe_prediction(request_id, served, logits, latency_ms=3.1, route="champion",
                               endpoint="/predict", samples=samples)      # request path
    monitor.feedback([("3f2a...", "Sneaker")])                           # off the event loop
    monitor.close()

The request path only decides sampling (a hash of the request id, so an id is always in or
out) and appends a tuple to the log's bounded buffer. The log's writer thread turns it into
records (top-k, input summary), feeds the windows (`LiveStats`, drift) and writes the lines.
A maintenance thread reads what the other workers wrote (`LogReader`; at start, the tail of the
log: the windows and the feedback join survive a restart), refreshes the gauges every
`refresh_s` and publishes online accuracy as MLflow version tags through `publish`.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from dlpipe.quality.drift import DriftProfile, DriftWindow, load_profile
from dlpipe.quality.feedback import FeedbackResult, accuracy_tags, judge, tags_key
from dlpipe.quality.live import LiveStats
from dlpipe.quality.metrics import QualityMetrics
from dlpipe.quality.predlog import LogReader, PredictionLog
from dlpipe.quality.summary import summarize_many

log = logging.getLogger(__name__)
Publish = Callable[[str, dict[str, str]], None]
"""Sets model-version tags: (version, {tag: value})."""


@dataclass(frozen=True)
class VersionInfo:
    """What quality needs to know about a served version."""

    class_names: list[str]
    profile: DriftProfile | None
    reference_accuracy: float | None

    @classmethod
    def of(cls, served: Any) -> VersionInfo:
        """From a served version (`dlpipe.serving.served.ServedModel` or alike): its class
        names, the profile in its package directory, its metadata's `test/acc`."""
        profile = None
        package_dir = getattr(served, "package_dir", None)
        if package_dir is not None:
            try:
                profile = load_profile(Path(package_dir))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("version %s: unreadable drift profile", served.version, exc_info=True)
        metadata = getattr(getattr(served, "engine", None), "metadata", None)
        accuracy = getattr(metadata, "accuracy_metrics", None) or {}
        reference = accuracy.get("test/acc")
        names = list(served.preprocessing.class_names or [])
        return cls(names, profile, None if reference is None else float(reference))


def top_k(logits: np.ndarray, names: list[str], k: int) -> list[dict[str, Any]]:
    """The served answer's top-k (same rounding as the response)."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    return [
        {
            "label": names[i] if i < len(names) else str(int(i)),
            "class_index": int(i),
            "probability": round(float(p[i]), 6),
        }
        for i in np.argsort(-p)[:k]
    ]


class QualityMonitor:
    """See the module docstring. Args mirror the `prediction_log_*` / `quality_*` settings."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        log_dir: str | Path | None = None,
        sample: float = 1.0,
        window: int = 1000,
        top_k: int = 5,
        max_bytes: int = 64 * 1024 * 1024,
        max_files: int = 0,
        buffer: int = 10_000,
        replay_bytes: int = 64 * 1024 * 1024,
        refresh_s: float = 1.0,
        served_versions: Callable[[], dict[str, Any]] = dict,
        publish: Publish | None = None,
        publish_interval_s: float = 60.0,
    ) -> None:
        self.metrics = QualityMetrics(registry)
        self.live = LiveStats(window)
        self.window = window
        self.k = top_k
        self.log = PredictionLog(
            log_dir,
            prepare=self._prepare,
            max_bytes=max_bytes,
            max_files=max_files,
            capacity=buffer,
            on_written=self.metrics.log_written.inc,
            on_dropped=lambda reason, n: self.metrics.log_dropped.labels(reason).inc(n),
        )
        self.reader = None if log_dir is None else LogReader(log_dir, self.log.stem, replay_bytes)
        self.refresh_s = refresh_s
        self.served_versions = served_versions
        self.publish = publish
        self.publish_interval_s = publish_interval_s
        self._threshold = int(min(max(sample, 0.0), 1.0) * 2**32)
        self._lock = threading.Lock()
        self._drift: dict[str, DriftWindow] = {}
        self._infos: dict[str, VersionInfo] = {}
        self._published: dict[str, tuple[int, int]] = {}
        self._published_at = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ request path
    def sampled(self, request_id: str) -> bool:
        return zlib.crc32(request_id.encode()) < self._threshold

    def observe_prediction(
        self,
        request_id: str,
        served: Any,
        logits: list[np.ndarray],
        *,
        latency_ms: float,
        route: str,
        endpoint: str,
        samples: list[Any] | None = None,
        pixels: list[int] | None = None,
        answers: list[list[dict[str, Any]]] | None = None,
    ) -> None:
        """One answered request (200) with one logits row per input; `answers`: the top-k
        already sent, when there is one (saves computing it again)."""
        if self.sampled(request_id):
            item = (time.time(), request_id, served, logits, latency_ms, route, endpoint)
            self.log.submit(("p", *item, samples, pixels, answers))

    def observe_error(
        self,
        request_id: str,
        version: str,
        *,
        status: int,
        error: str,
        latency_ms: float,
        route: str,
        endpoint: str,
    ) -> None:
        """A request that a version was chosen for and that failed (for per-version error
        rates: deadlines, inference failures, memory)."""
        if self.sampled(request_id):
            record = {
                "type": "error",
                "ts": time.time(),
                "request_id": request_id,
                "model_version": version,
                "route": route,
                "endpoint": endpoint,
                "status": status,
                "error": error,
                "latency_ms": round(latency_ms, 3),
            }
            self.log.submit(("e", record))

    # ------------------------------------------------------------------ writer thread
    def _prepare(self, items: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """Log records of the items queued since the last drain, in order."""
        predictions = [item for item in items if item[0] == "p"]
        summaries = iter(self._summaries(predictions))
        records: list[dict[str, Any]] = []
        fresh: list[dict[str, Any]] = []  # feedback is already in the windows
        for item in items:
            if item[0] == "p":
                batch = self._predictions(item, next(summaries))
                records.extend(batch)
                fresh.extend(batch)
            else:
                records.append(item[1])
                if item[0] == "e":
                    fresh.append(item[1])
        self._ingest(fresh)
        return records

    def _summaries(self, items: list[tuple[Any, ...]]) -> list[list[dict[str, float]]]:
        """Input summaries of every prediction item, computed together (`summarize_many`)."""
        inputs = []
        counts = []
        for item in items:
            served, logits, samples, pixels = item[3], item[4], item[8], item[9]
            if samples is None:
                counts.append(0)
                continue
            info = self._info(served.version, served) or VersionInfo.of(served)
            table = info.profile.table if info.profile is not None else None
            counts.append(len(logits))
            for i in range(len(logits)):
                inputs.append((samples[i], pixels[i] if pixels else None, table))
        flat = iter(summarize_many(inputs))
        return [[next(flat) for _ in range(n)] for n in counts]

    def _predictions(
        self, item: tuple[Any, ...], summaries: list[dict[str, float]]
    ) -> list[dict[str, Any]]:
        _, ts, request_id, served, logits, latency_ms, route, endpoint, _, _, answers = item
        info = self._info(served.version, served) or VersionInfo.of(served)
        many = len(logits) > 1
        records = []
        for i, row in enumerate(logits):
            records.append(
                {
                    "type": "prediction",
                    "ts": ts,
                    # One input: the request id; several: "<request id>/<position>".
                    "request_id": f"{request_id}/{i}" if many else request_id,
                    "model_name": served.model_name,
                    "model_version": served.version,
                    "route": route,
                    "endpoint": endpoint,
                    "status": 200,
                    "latency_ms": round(latency_ms, 3),
                    "top_k": answers[i] if answers else top_k(row, info.class_names, self.k),
                    "input": summaries[i] if summaries else {},
                }
            )
        return records

    def _ingest(self, records: list[dict[str, Any]]) -> None:
        self.live.ingest_many(records)
        with self._lock:
            for r in records:
                if r.get("type") == "prediction" and r.get("input") is not None:
                    window = self._drift.get(r["model_version"])
                    if window is None:
                        window = self._drift[r["model_version"]] = DriftWindow(self.window)
                    window.add(r["input"], int(r["top_k"][0]["class_index"]))

    def _info(self, version: str, served: Any = None) -> VersionInfo | None:
        info = self._infos.get(version)
        if info is None:
            served = served if served is not None else self.served_versions().get(version)
            if served is None:
                return None
            info = self._infos[version] = VersionInfo.of(served)
        return info

    # ------------------------------------------------------------------ feedback
    def feedback(self, items: list[tuple[str, str | int]]) -> list[FeedbackResult]:
        """Join labels to logged predictions (blocking: call it off the event loop)."""
        self.log.flush()  # predictions answered just now may still be queued
        if self.reader is not None and any(self.live.lookup(rid) is None for rid, _ in items):
            self._follow()  # another worker's, written since the last poll
        results = [self._label(rid, label) for rid, label in items]
        for r in results:
            self.metrics.feedback.labels(r.model_version or "", r.outcome).inc()
        return results

    def _label(self, request_id: str, label: str | int) -> FeedbackResult:
        prediction = self.live.lookup(request_id)
        info = None if prediction is None else self._info(prediction.model_version)
        result, record = judge(self.live, info.class_names if info else None, request_id, label)
        if record is not None:
            self.live.ingest(record)
            self.log.submit(("f", record))  # never sampled out: labels are scarce
        return result

    # ------------------------------------------------------------------ maintenance
    def start(self) -> None:
        self.log.start()
        if self._thread is None:
            self._thread = threading.Thread(target=self._maintain, name="quality", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the threads; everything queued is written first (blocking)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10.0)
        self.log.close()

    def _maintain(self) -> None:
        while True:
            try:
                self._follow()
                self.refresh()
                if self.publish is not None:
                    self._publish_tags()
            except Exception:  # the next round may work: never let the thread die
                log.exception("quality refresh failed")
            if self._stop.wait(self.refresh_s):
                return

    def _follow(self) -> None:
        if self.reader is not None:
            records = self.reader.poll()
            if records:
                self._ingest(records)

    def drift_scores(self, version: str) -> dict[str, float] | None:
        """PSI per statistic of the version's window; None without a profile or enough data."""
        info = self._info(version)
        with self._lock:
            window = self._drift.get(version)
            if info is None or info.profile is None or window is None or not window.ready():
                return None
            values, predicted = window.columns()
        return info.profile.scores(values, predicted)

    def refresh(self) -> None:
        """Set the gauges of every served version (and drop the others')."""
        self.metrics.begin()
        for version, served in self.served_versions().items():
            info = self._info(version, served)
            with self._lock:
                window = self._drift.get(version)
                samples = window.count if window is not None else 0
            reference = info.reference_accuracy if info is not None else None
            stats = self.live.stats(version)
            self.metrics.show(version, stats, self.drift_scores(version), samples, reference)
        self.metrics.hide_others()

    def _publish_tags(self) -> None:
        if time.monotonic() - self._published_at < self.publish_interval_s:
            return
        self._published_at = time.monotonic()
        assert self.publish is not None
        for version in self.served_versions():
            stats = self.live.stats(version)
            if stats.accuracy is None or self._published.get(version) == tags_key(stats):
                continue
            try:
                self.publish(version, accuracy_tags(stats, self.window))
                self._published[version] = tags_key(stats)
            except Exception as err:
                log.warning("online accuracy tags for version %s not set: %r", version, err)
