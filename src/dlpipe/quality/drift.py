"""Drift: a version's reference profile, and live traffic compared to it with PSI.

The profile (`drift_profile.json` in the model package, written at registration by
`dlpipe.quality.profile`) holds, per input statistic (`dlpipe.quality.summary`), the training
data's histogram on bins cut at its deciles, plus the predicted class distribution on the test
split. The server keeps a sliding window of the last `quality_window` served inputs per version
and scores each statistic with the Population Stability Index:

    PSI = sum over bins of (live - reference) * ln(live / reference)

with both sides' bin shares smoothed by half a count (Jeffreys), so an empty bin is finite.
Usual reading: below 0.1 stable, 0.1-0.25 moderate shift, above 0.25 significant shift.
The bins are the reference's deciles plus one bin below its minimum and one above its maximum,
so inputs outside anything seen in training count fully (a constant statistic, such as the
pixel count of a dataset of 28 x 28 images, has exactly those three bins).

PSI is preferred over a distribution test (Kolmogorov-Smirnov) because with thousands of live
samples a test calls every negligible difference significant; PSI measures the size of a shift.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.quality.summary import CLASS_STATISTIC, coverage_table

PROFILE_FILE = "drift_profile.json"
PROFILE_FORMAT = 1
BINS = 10
DRIFT_THRESHOLD = 0.25
"""PSI above which a statistic has drifted (the alert rule's threshold; docs/monitoring.md)."""
MIN_SAMPLES = 100
"""Scores are reported once a version's window holds this many inputs (or is full)."""


def cut_points(values: np.ndarray, bins: int = BINS) -> np.ndarray:
    """Bin boundaries for `np.searchsorted(cuts, x, side="right")`: the minimum, the inner
    quantiles, and just above the maximum (so bin 0 is below and the last bin above the data)."""
    values = np.asarray(values, dtype=np.float64)
    inner = np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    top = np.nextafter(values.max(), math.inf)
    return np.unique(np.concatenate([[values.min()], inner, [top]]))


def bin_counts(cuts: np.ndarray, values: np.ndarray) -> np.ndarray:
    index = np.searchsorted(cuts, np.asarray(values, dtype=np.float64), side="right")
    return np.bincount(index, minlength=len(cuts) + 1)


def psi(reference_counts: Iterable[float], live_counts: Iterable[float]) -> float:
    """Population Stability Index of two histograms on the same bins (half-count smoothing)."""
    ref = np.asarray(list(reference_counts), dtype=np.float64) + 0.5
    live = np.asarray(list(live_counts), dtype=np.float64) + 0.5
    if ref.shape != live.shape:
        raise ValueError(f"histograms differ in bins: {ref.shape} vs {live.shape}")
    ref /= ref.sum()
    live /= live.sum()
    return float(np.sum((live - ref) * np.log(live / ref)))


@dataclass
class StatisticReference:
    """One statistic's reference histogram."""

    cuts: list[float]
    counts: list[int]

    @classmethod
    def of(cls, values: np.ndarray, bins: int = BINS) -> StatisticReference:
        cuts = cut_points(values, bins)
        return cls([float(c) for c in cuts], [int(c) for c in bin_counts(cuts, values)])

    def score(self, values: np.ndarray) -> float:
        return psi(self.counts, bin_counts(np.asarray(self.cuts), values))


@dataclass
class DriftProfile:
    """What a version's training data looked like (see the module docstring)."""

    statistics: dict[str, StatisticReference]
    classes: list[int] | None = None
    """Predicted class counts on the test split, by class index."""
    vocabulary: list[int] | None = None
    """Token ids that occur in the training texts (text models)."""
    samples: int = 0
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table = coverage_table(self.vocabulary) if self.vocabulary else None

    def scores(self, window: dict[str, np.ndarray], predicted: np.ndarray) -> dict[str, float]:
        """PSI of each statistic the window and the profile both have."""
        out = {
            name: ref.score(window[name])
            for name, ref in self.statistics.items()
            if name in window and len(window[name])
        }
        if self.classes and len(predicted):
            k = len(self.classes)
            live = np.bincount(np.clip(predicted, 0, k), minlength=k + 1)
            # An index beyond the reference's classes lands in one extra, empty reference bin.
            out[CLASS_STATISTIC] = psi([*self.classes, 0], live[: k + 1])
        return out

    def to_json(self) -> str:
        body = {
            "format": PROFILE_FORMAT,
            "samples": self.samples,
            "source": self.source,
            "statistics": {k: vars(v) for k, v in self.statistics.items()},
            "classes": self.classes,
            "vocabulary": self.vocabulary,
            **({"extra": self.extra} if self.extra else {}),
        }
        return json.dumps(body, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DriftProfile:
        body = json.loads(text)
        if body.get("format") != PROFILE_FORMAT:
            raise ValueError(f"unknown drift profile format {body.get('format')!r}")
        stats = {k: StatisticReference(**v) for k, v in body["statistics"].items()}
        return cls(
            stats,
            body.get("classes"),
            body.get("vocabulary"),
            int(body.get("samples", 0)),
            str(body.get("source", "")),
            dict(body.get("extra") or {}),
        )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PROFILE_FILE
        path.write_text(self.to_json())
        return path


def load_profile(directory: str | Path) -> DriftProfile | None:
    """The profile saved in a package directory; None when it has none."""
    path = Path(directory) / PROFILE_FILE
    if not path.is_file():
        return None
    return DriftProfile.from_json(path.read_text())


class DriftWindow:
    """The last `size` served inputs of one version: their statistics and predicted classes."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.count = 0
        self._pos = 0
        self._values: dict[str, np.ndarray] = {}
        self._predicted = np.zeros(size, dtype=np.int64)

    def add(self, summary: dict[str, float], predicted: int) -> None:
        i = self._pos
        for name in summary.keys() - self._values.keys():
            self._values[name] = np.full(self.size, np.nan)
        for name, column in self._values.items():
            column[i] = summary.get(name, np.nan)  # a statistic this input lacks is no value
        self._predicted[i] = predicted
        self._pos = (i + 1) % self.size
        self.count = min(self.count + 1, self.size)

    def columns(self) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The window's values (NaN-free, per statistic) and predicted classes (>= 0)."""
        n = self.count
        values = {}
        for name, column in self._values.items():
            part = column[:n]
            values[name] = part[~np.isnan(part)]
        predicted = self._predicted[:n]
        return values, predicted[predicted >= 0]

    def ready(self) -> bool:
        return self.count >= min(MIN_SAMPLES, self.size)
