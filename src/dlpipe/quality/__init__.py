"""Model quality in production: the prediction log, feedback and online accuracy, drift.

- `predlog`: `PredictionLog` (durable, rotated, sampled JSON Lines, written off the event loop)
  and `LogReader` / `read_records` (any process reads it back)
- `live`: `LiveStats`, per-version windows (latency, status, predicted classes, accuracy from
  feedback): the read side other packages use (`LiveStats.from_log(directory)`)
- `drift`: `DriftProfile` (saved in a model package as `drift_profile.json`), PSI, windows
- `profile`: building a profile from training data at registration
- `monitor`: `QualityMonitor`, what `dlpipe serve` runs; `metrics`: its Prometheus metrics

Imports numpy and prometheus-client, and `dlpipe.data` only to build a profile: no framework,
no MLflow, nothing of `dlpipe.serving` (which imports this package).
"""

from dlpipe.quality.drift import PROFILE_FILE, DriftProfile, load_profile, psi
from dlpipe.quality.feedback import FeedbackResult
from dlpipe.quality.live import LiveStats, VersionStats
from dlpipe.quality.monitor import QualityMonitor
from dlpipe.quality.predlog import LogReader, PredictionLog, read_records

__all__ = [
    "PROFILE_FILE",
    "DriftProfile",
    "FeedbackResult",
    "LiveStats",
    "LogReader",
    "PredictionLog",
    "QualityMonitor",
    "VersionStats",
    "load_profile",
    "psi",
    "read_records",
]
