"""Prometheus scrape config and alert rules: promtool checks, rule unit tests, metric names."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
PROM_DIR = DEPLOY_DIR / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (`make system-deps` installs Debian prometheus)",
)


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60
    )


@needs_promtool
def test_promtool_check_config() -> None:
    result = _promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_rule_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_rule_unit_tests_catch_a_broken_threshold(tmp_path) -> None:
    """The unit tests are not vacuous: raising a threshold makes them fail."""
    alerts = (PROM_DIR / "alerts.yml").read_text()
    assert alerts.count("> 0.05\n") == 2  # error-rate and p95 thresholds
    (tmp_path / "alerts.yml").write_text(alerts.replace("> 0.05\n", "> 0.5\n"))
    shutil.copy(PROM_DIR / "alerts_test.yml", tmp_path)
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", "alerts_test.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DlpipeHighErrorRate" in result.stdout + result.stderr


def test_rule_tests_cover_every_alert_firing_and_silent() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "DlpipeHighErrorRate",
        "DlpipeHighP95Latency",
        "DlpipeDown",
        "DlpipeQueueSaturated",
    }
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    cases = [c for t in tests["tests"] for c in t.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fires == alerts
    assert silent == alerts


def test_p95_alert_threshold_is_50_ms() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    by_name = {r.get("alert") or r.get("record"): r for g in rules["groups"] for r in g["rules"]}
    assert by_name["DlpipeHighP95Latency"]["expr"].strip().endswith("> 0.05")
    assert "histogram_quantile(0.95" in by_name["dlpipe:request_latency_seconds:p95_5m"]["expr"]


def test_rules_only_use_metrics_the_collector_exposes(
    exposed_metrics: set[str], promql_metric_names: Callable[[str], set[str]]
) -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    used = set()
    for group in rules["groups"]:
        for rule in group["rules"]:
            used |= promql_metric_names(rule["expr"])
    unknown = used - exposed_metrics - recorded - {"up"}
    assert not unknown, f"alert rules use metrics MetricsCollector does not expose: {unknown}"
    assert "dlpipe_request_latency_seconds_bucket" in used


def test_scrape_config_targets_the_dlpipe_metrics_endpoint() -> None:
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    assert cfg["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "dlpipe"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    compose = yaml.safe_load((DEPLOY_DIR / "docker-compose.yml").read_text())
    assert "dlpipe" in compose["services"]
    assert targets == ["dlpipe:8000"]  # the compose service name and its container port


def test_promql_parser_finds_metric_names(promql_metric_names: Callable[[str], set[str]]) -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model_version) (rate(dlpipe_x_bucket{a="b c"}[5m])))'
        " / ignoring(route) group_left sum(rate(dlpipe_y_total[1m])) > bool 0.5 and up == 0"
    )
    assert promql_metric_names(expr) == {"dlpipe_x_bucket", "dlpipe_y_total", "up"}
