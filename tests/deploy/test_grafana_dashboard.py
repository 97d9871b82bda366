"""Grafana: provisioning files and the dashboard's PromQL against the metrics dlpipe exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

GRAFANA = Path(__file__).resolve().parents[2] / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "dlpipe.json"


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_datasource_uid_matches_every_panel_and_target(dashboard: dict[str, Any]) -> None:
    provisioned = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = provisioned["datasources"]
    assert source["type"] == "prometheus"
    uid = source["uid"]
    assert dashboard["panels"], "dashboard has no panels"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, panel["title"]


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/dashboards.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((GRAFANA.parent / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts


def test_every_query_uses_only_metrics_the_collector_exposes(
    dashboard: dict[str, Any],
    exposed_metrics: set[str],
    promql_metric_names: Callable[[str], set[str]],
) -> None:
    for title, expr in _exprs(dashboard):
        names = promql_metric_names(expr)
        assert names, f"no metric found in {title!r}: {expr}"
        unknown = names - exposed_metrics - {"up"}
        assert not unknown, f"panel {title!r} queries unknown metrics {unknown}: {expr}"


def test_dashboard_shows_what_the_issue_asks_for(dashboard: dict[str, Any]) -> None:
    exprs = [e for _, e in _exprs(dashboard)]
    joined = "\n".join(exprs)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, e) for e in exprs)

    for quantile in ("0.5", "0.95", "0.99"):
        assert has(
            rf"histogram_quantile\({quantile}, sum by \(le, model_version\) "
            r"\(rate\(dlpipe_request_latency_seconds_bucket"
        ), f"latency p{quantile} by model version"
    assert has(r"rate\(dlpipe_requests_total"), "throughput"
    assert has(r"sum by \(error_type\) \(rate\(dlpipe_errors_total"), "error rate by type"
    assert "dlpipe_batch_size" in joined and "dlpipe_queue_wait_seconds_bucket" in joined
    assert "dlpipe_gpu_utilization_percent" in joined
    assert "dlpipe_gpu_memory_used_bytes" in joined
    assert has(r"sum by \([^)]*model_version[^)]*\) \(rate\(dlpipe_routed_requests_total"), "A/B"


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine


def test_dashboard_error_ratio_is_the_one_that_pages(dashboard: dict[str, Any]) -> None:
    """What on-call sees on the dashboard is the ratio the critical alert fires on."""
    rules = yaml.safe_load((GRAFANA.parent / "prometheus" / "alerts.yml").read_text())
    (record,) = [
        r
        for g in rules["groups"]
        for r in g["rules"]
        if r.get("record") == "dlpipe:server_error_ratio:rate5m"
    ]
    expected = " ".join(record["expr"].split()).replace("[5m]", "[$__rate_interval]")
    exprs = [" ".join(e.split()) for _, e in _exprs(dashboard)]
    assert expected in exprs


def test_dashboard_shows_model_quality(dashboard: dict[str, Any]) -> None:
    """Online accuracy beside the test accuracy the alert compares it with, drift scores with
    the alerts' threshold drawn, feedback outcomes and the prediction log's drops."""
    by_title = {p["title"]: p for p in dashboard["panels"]}
    exprs = {title: [t["expr"] for t in p["targets"]] for title, p in by_title.items()}
    accuracy = exprs["Online accuracy by model version"]
    assert "max by (model_version) (dlpipe_online_accuracy)" in accuracy
    assert "max by (model_version) (dlpipe_reference_accuracy)" in accuracy
    assert exprs["Online accuracy by true class"] == [
        "max by (model_version, class) (dlpipe_online_class_accuracy)"
    ]
    drift = by_title["Drift score (PSI) by statistic"]
    assert exprs[drift["title"]] == ["max by (model_version, statistic) (dlpipe_drift_score)"]
    rules = yaml.safe_load((GRAFANA.parent / "prometheus" / "alerts.yml").read_text())
    (rule,) = [
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "DlpipeInputDrift"
    ]
    threshold = float(rule["expr"].rsplit(">", 1)[1])
    steps = drift["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert steps[-1]["value"] == threshold  # the line on the panel is the alert's
    assert any("dlpipe_feedback_total" in e for e in exprs["Feedback labels by outcome"])
    log = " ".join(exprs["Prediction log: records written and dropped"])
    assert "dlpipe_prediction_log_written_total" in log
    assert "dlpipe_prediction_log_dropped_total" in log


def test_dashboard_shows_the_canary(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(
        t["expr"]
        for p in dashboard["panels"]
        if p["title"].startswith("Canary")
        for t in p["targets"]
    )
    for name in (
        "dlpipe_canary_step_percent",
        "dlpipe_canary_decisions_total",
        "dlpipe_canary_p_value",
    ):
        assert name in exprs, name
