"""Shared helpers for deploy tests: what MetricsCollector exposes, and metric names in PromQL."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dlpipe.monitoring.metrics import MetricsCollector
from dlpipe.quality.canary_runner import CanaryMetrics
from dlpipe.quality.live import VersionStats
from dlpipe.quality.metrics import QualityMetrics

# deploy_helpers.py (processes, configs) is imported by the test modules beside it.
sys.path.insert(0, str(Path(__file__).parent))

_KEYWORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
    | {"and", "or", "unless", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords and labels left out)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _KEYWORDS:
            continue
        names.add(name)
    return names


def exposed_sample_names() -> set[str]:
    """Every sample name the server renders (MetricsCollector and the quality metrics on its
    registry), and the canary runner, once each metric has a labelled child."""
    c = MetricsCollector()
    c.record_latency(3.0, endpoint="predict", model_version="1")
    c.record_error("invalid_input")
    c.record_batch(2, 0.001, 0.002, "1")
    c.set_queue("1", 0, 8)
    c.record_route("m", "1", "champion")
    c.record_gpu_utilization(1.0)
    c.record_gpu_memory(1, 2)
    c.set_model_info("m", "1")
    c.record_throughput(1.0)
    # The quality metrics live on the same registry in the server (dlpipe.quality).
    q = QualityMetrics(c.registry)
    q.log_written.inc()
    q.feedback.labels("1", "correct").inc()
    stats = VersionStats("1", 1, np.array([1.0]), {200: 1}, {"a": 1}, 1, 1, {"a": 1}, {"a": 1})
    q.begin()
    q.show("1", stats, {"mean_intensity": 0.1}, 1, 0.9)
    q.hide_others()
    with c.track_in_flight():
        body = c.render()[0].decode()
    # The canary runner serves its own registry (--metrics-port), a scrape target of its own.
    canary = CanaryMetrics()
    canary.step.labels("m", "2").set(5)
    canary.decisions.labels("m", "advance").inc()
    canary.p_value.labels("m", "latency").set(0.5)
    canary.samples.labels("m", "candidate_requests").set(300)
    body += generate_latest(canary.registry).decode()
    return {s.name for f in text_string_to_metric_families(body) for s in f.samples}


@pytest.fixture(scope="session")
def exposed_metrics() -> set[str]:
    return exposed_sample_names()


@pytest.fixture(scope="session")
def promql_metric_names() -> Callable[[str], set[str]]:
    return metric_names_in
