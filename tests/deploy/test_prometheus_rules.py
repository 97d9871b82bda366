"""Prometheus scrape config and alert rules: promtool checks, rule unit tests, metric names."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY_DIR = Path(__file__).resolve().parents[2] / "deploy"
PROM_DIR = DEPLOY_DIR / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not installed (`make system-deps` installs Debian prometheus)",
)


def _promtool(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _rule_tests_with(alerts: str, directory: Path) -> subprocess.CompletedProcess[str]:
    """The shipped rule unit tests run against another version of alerts.yml."""
    (directory / "alerts.yml").write_text(alerts)
    shutil.copy(PROM_DIR / "alerts_test.yml", directory)
    return _promtool("test", "rules", "alerts_test.yml", cwd=directory)


@needs_promtool
def test_promtool_check_config(tmp_path: Path) -> None:
    # promtool opens the scrape's credentials file: the compose secret's path exists only in
    # the container, so the copy checked here names a local file instead.
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dlpipe"]
    assert job["authorization"]["credentials_file"] == "/run/secrets/dlpipe_metrics_key"
    token = tmp_path / "dlpipe_metrics_key"
    token.write_text("key")
    job["authorization"]["credentials_file"] = str(token)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROM_DIR / "alerts.yml", tmp_path)
    result = _promtool("check", "config", str(tmp_path / "prometheus.yml"))
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
    result = _rule_tests_with(alerts.replace("> 0.05\n", "> 0.5\n"), tmp_path)
    assert result.returncode != 0
    assert "DlpipeHighErrorRate" in result.stdout + result.stderr


def _quality_rule(name: str) -> dict[str, Any]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    (rule,) = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name]
    return rule


def _with_rule(name: str, **changes: Any) -> str:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == name:
                rule.update(changes)
    return yaml.safe_dump(rules)


# Each quality alert's unit tests fail when its rule is broken: a threshold too high (the
# firing case), no `for` or a threshold too low (the silent ones), no minimum label count.
BROKEN_QUALITY_RULES = {
    "drift threshold 2.5": ("DlpipeInputDrift", "> 0.25", "> 2.5"),
    "drift threshold 0.01": ("DlpipeInputDrift", "> 0.25", "> 0.01"),
    "input drift counts predicted classes": (
        "DlpipeInputDrift",
        '{statistic!="predicted_class"}',
        "",
    ),
    "prediction drift threshold 2.5": ("DlpipePredictionDrift", "> 0.25", "> 2.5"),
    "accuracy margin 0.5": ("DlpipeOnlineAccuracyDrop", "- 0.05", "- 0.5"),
    "accuracy without a label minimum": ("DlpipeOnlineAccuracyDrop", ">= 200", ">= 0"),
    "log drops never": ("DlpipePredictionLogDropping", "> 0", "> 100"),
}


@needs_promtool
@pytest.mark.parametrize("broken", sorted(BROKEN_QUALITY_RULES))
def test_quality_rule_tests_catch_a_broken_rule(broken: str, tmp_path: Path) -> None:
    name, old, new = BROKEN_QUALITY_RULES[broken]
    expr = _quality_rule(name)["expr"]
    assert old in expr, (name, expr)
    result = _rule_tests_with(_with_rule(name, expr=expr.replace(old, new)), tmp_path)
    assert result.returncode != 0, result.stdout
    assert name in result.stdout + result.stderr


@needs_promtool
@pytest.mark.parametrize("name", ["DlpipeInputDrift", "DlpipeOnlineAccuracyDrop"])
def test_quality_alerts_need_sustained_evidence(name: str, tmp_path: Path) -> None:
    """Without `for`, a 5-minute burst or a young shift would page: the silent cases say so."""
    rule = _quality_rule(name)
    assert rule["for"] in ("10m", "15m")
    broken = {k: v for k, v in rule.items() if k != "for"}
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        group["rules"] = [broken if r.get("alert") == name else r for r in group["rules"]]
    result = _rule_tests_with(yaml.safe_dump(rules), tmp_path)
    assert result.returncode != 0, result.stdout
    assert name in result.stdout + result.stderr


SERVER_ERRORS = 'status=~"5.."'
ANSWERED = 'status!~"4.."'
# Rules that would let a scanner page on-call: every error counted, or every non-2xx answer.
PAGED_BY_SCANNERS = {
    "errors_total": (
        "sum(rate(dlpipe_errors_total[5m]))"
        ' / sum(rate(dlpipe_requests_total{endpoint=~".*(predict|infer).*"}[5m]))'
    ),
    "client_errors": (
        'sum(rate(dlpipe_requests_total{status!~"2.."}[5m])) / sum(rate(dlpipe_requests_total[5m]))'
    ),
}


@needs_promtool
@pytest.mark.parametrize("naive", sorted(PAGED_BY_SCANNERS))
def test_rule_unit_tests_catch_an_error_rate_that_scanners_trigger(
    naive: str, tmp_path: Path
) -> None:
    """The silent cases are not vacuous: a ratio that counts client errors pages on them."""
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule.get("record") == "dlpipe:server_error_ratio:rate5m":
                rule["expr"] = PAGED_BY_SCANNERS[naive]
    result = _rule_tests_with(yaml.safe_dump(rules), tmp_path)
    assert result.returncode != 0, result.stdout
    assert "DlpipeHighErrorRate" in result.stdout + result.stderr
    assert "exp:[]" in (result.stdout + result.stderr).replace(" ", "")  # a silent case fired


def test_error_rate_counts_server_errors_only() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    by_name = {r.get("alert") or r.get("record"): r for g in rules["groups"] for r in g["rules"]}
    assert (
        by_name["DlpipeHighErrorRate"]["expr"].strip() == "dlpipe:server_error_ratio:rate5m > 0.05"
    )
    assert by_name["DlpipeHighErrorRate"]["labels"]["severity"] == "critical"
    numerator, denominator = by_name["dlpipe:server_error_ratio:rate5m"]["expr"].split(" / ")
    assert "dlpipe_errors_total" not in numerator + denominator  # counts client errors too
    assert SERVER_ERRORS in numerator and ANSWERED in denominator
    # Probes and scrapes are neither: a pod that is not ready answers /ready with 503.
    for part in (numerator, denominator):
        assert 'endpoint!~"/health|/ready|/metrics|/v2/health/.*"' in part


def test_rule_tests_cover_every_alert_firing_and_silent() -> None:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "DlpipeHighErrorRate",
        "DlpipeHighP95Latency",
        "DlpipeDown",
        "DlpipeQueueSaturated",
        "DlpipeInputDrift",
        "DlpipePredictionDrift",
        "DlpipeOnlineAccuracyDrop",
        "DlpipePredictionLogDropping",
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
    assert job["authorization"]["type"] == "Bearer"  # /metrics needs a key like every route


def test_promql_parser_finds_metric_names(promql_metric_names: Callable[[str], set[str]]) -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model_version) (rate(dlpipe_x_bucket{a="b c"}[5m])))'
        " / ignoring(route) group_left sum(rate(dlpipe_y_total[1m])) > bool 0.5 and up == 0"
    )
    assert promql_metric_names(expr) == {"dlpipe_x_bucket", "dlpipe_y_total", "up"}
