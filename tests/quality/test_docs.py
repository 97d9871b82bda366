"""docs/monitoring.md explains every quality metric, setting and alert the code ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dlpipe.quality.live import VersionStats
from dlpipe.quality.metrics import QUALITY_METRIC_NAMES, QualityMetrics
from dlpipe.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "monitoring.md").read_text()


def test_the_metric_names_are_the_ones_rendered_and_documented() -> None:
    registry = CollectorRegistry()
    metrics = QualityMetrics(registry)
    metrics.log_written.inc()
    metrics.feedback.labels("1", "correct").inc()
    stats = VersionStats("1", 1, np.array([1.0]), {200: 1}, {"a": 1}, 1, 1, {"a": 1}, {"a": 1})
    metrics.begin()
    metrics.show("1", stats, {"mean_intensity": 0.1}, 1, 0.9)
    metrics.hide_others()
    rendered = {
        s.name
        for f in text_string_to_metric_families(generate_latest(registry).decode())
        for s in f.samples
        if not s.name.endswith("_created")
    }
    assert rendered == set(QUALITY_METRIC_NAMES)
    for name in QUALITY_METRIC_NAMES:
        assert f"`{name}`" in DOC, name


def test_settings_and_alerts_are_documented() -> None:
    quality = [f for f in ServeSettings.model_fields if f.startswith(("prediction_log", "quality"))]
    assert len(quality) == 7
    for field in quality:
        assert f"`{field}`" in DOC, field
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    for alert in (r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r):
        assert f"| `{alert}` |" in DOC, alert
