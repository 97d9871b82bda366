"""Alertmanager: its config (amtool), its routing of every rule, and a real alert end to end.

The end-to-end test starts a real `dlpipe serve` (API keys required, /metrics included), a real
Prometheus scraping it with the shipped scrape config and bearer-token authorization, a real
Alertmanager with the shipped routing tree, and a webhook receiver. A scanner's flood of client
errors must page nobody; real server errors must reach the on-call webhook.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from deploy_helpers import (
    ALERTMANAGER,
    AMTOOL,
    DEPLOY,
    PROMETHEUS,
    ROOT,
    WebhookReceiver,
    alertmanager,
    failing_package,
    prometheus,
    query,
    scalar,
    shipped_prometheus_config,
    wait_for_value,
)

from dlpipe.evaluation import ServerProcess

AM_CONFIG = DEPLOY / "alertmanager" / "alertmanager.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
needs_amtool = pytest.mark.skipif(
    AMTOOL is None,
    reason="amtool not installed (`make system-deps` installs Debian prometheus-alertmanager)",
)


def _amtool(*args: str, cwd: Path = AM_CONFIG.parent) -> subprocess.CompletedProcess[str]:
    assert AMTOOL is not None
    return subprocess.run([AMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def _alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


@needs_amtool
def test_amtool_check_config() -> None:
    result = _amtool("check-config", AM_CONFIG.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_amtool
def test_amtool_rejects_a_route_to_an_unknown_receiver(tmp_path: Path) -> None:
    """The check above is not vacuous: a route naming a receiver that does not exist fails."""
    broken = AM_CONFIG.read_text().replace("receiver: dlpipe-oncall", "receiver: dlpipe-oncal")
    assert broken != AM_CONFIG.read_text()
    (tmp_path / "alertmanager.yml").write_text(broken)
    result = _amtool("check-config", "alertmanager.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "dlpipe-oncal" in result.stdout + result.stderr


@needs_amtool
@pytest.mark.parametrize("rule", _alert_rules(), ids=lambda r: r["alert"])
def test_every_alert_routes_to_its_severitys_webhook(rule: dict[str, Any]) -> None:
    """Critical alerts page on-call, warnings go to the team; none falls through by accident."""
    severity = rule["labels"]["severity"]
    expected = {"critical": "dlpipe-oncall", "warning": "dlpipe-team"}[severity]
    labels = [f"alertname={rule['alert']}", f"severity={severity}", "job=dlpipe"]
    result = _amtool("config", "routes", "test", f"--config.file={AM_CONFIG.name}", *labels)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [expected]
    config = yaml.safe_load(AM_CONFIG.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == expected]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["send_resolved"] is True  # on-call also learns when it is over


def test_prometheus_sends_alerts_to_the_compose_alertmanager() -> None:
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (am,) = prom["alerting"]["alertmanagers"]
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    service = compose["services"]["alertmanager"]
    assert am["static_configs"] == [{"targets": ["alertmanager:9093"]}]
    assert any(p.endswith(":9093") for p in service["ports"])
    mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
    config_flag = next(c for c in service["command"] if c.startswith("--config.file="))
    assert mounts[config_flag.split("=", 1)[1]] == "./alertmanager/alertmanager.yml"
    assert "--cluster.listen-address=" in service["command"]  # no gossip port on a single node
    assert "alertmanager" in compose["services"]["prometheus"]["depends_on"]


# ------------------------------------------------------------------ end to end, real processes

KEY = "client-key-for-tests"
METRICS_KEY = "prometheus-key-for-tests"
SCANNER = "127.0.0.2"  # another source address: the failed-key lockout is per address
FAST_FOR = "2s"


def _png(value: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "dlpipe-alert-test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


class Client:
    """Plain HTTP/1.1 requests to the server from a chosen source address."""

    def __init__(self, port: int, source: str = "127.0.0.1", key: str | None = None) -> None:
        self.port, self.source, self.key = port, source, key

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=10, source_address=(self.source, 0)
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        all_headers = dict(headers or {})
        if self.key is not None:
            all_headers.setdefault("X-API-Key", self.key)
        conn = self._conn()
        try:
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def predict(self, png: bytes) -> tuple[int, bytes]:
        body, content_type = _multipart(png)
        return self.request("POST", "/predict", body, {"Content-Type": content_type})

    def hang_up_mid_body(self) -> None:
        """Announce a body, send a little of it, go away: the server records 499."""
        conn = self._conn()
        conn.putrequest("POST", "/predict")
        conn.putheader("X-API-Key", self.key or "")
        conn.putheader("Content-Type", "multipart/form-data; boundary=x")
        conn.putheader("Content-Length", "100000")
        conn.endheaders(b"--x\r\n")
        time.sleep(0.05)
        conn.close()


def _test_rules(work: Path) -> Path:
    """alerts.yml with DlpipeHighErrorRate's `for` shortened; every expression is the shipped one."""
    rules = yaml.safe_load(ALERTS.read_text())
    (rule,) = [
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "DlpipeHighErrorRate"
    ]
    rule["for"] = FAST_FOR
    path = work / "alerts.yml"
    path.write_text(yaml.safe_dump(rules))
    return path


def _test_alertmanager_config(webhook: str) -> dict[str, Any]:
    """The shipped routing tree with its webhooks on `webhook` (same paths) and 1 s waits."""
    config: dict[str, Any] = yaml.safe_load(AM_CONFIG.read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook + urllib.parse.urlsplit(hook["url"]).path
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
    return config


@pytest.mark.timeout(240)  # ~20 s on 2 cores
@pytest.mark.skipif(
    PROMETHEUS is None or ALERTMANAGER is None,
    reason="needs prometheus and alertmanager (`make system-deps`: Debian packages)",
)
def test_a_scanner_pages_nobody_and_real_server_errors_reach_the_oncall_webhook(
    tmp_path: Path,
) -> None:
    package = failing_package(tmp_path)
    token = tmp_path / "metrics_key"
    token.write_text(METRICS_KEY)
    env = {
        "OMP_NUM_THREADS": "1",
        "DLPIPE_API_KEYS": f"{KEY},{METRICS_KEY}",
        "DLPIPE_REQUIRE_AUTH": "true",
        "DLPIPE_ACCESS_LOG": "false",
        "DLPIPE_LOG_LEVEL": "warning",
        "DLPIPE_ORT_INTRA_OP_THREADS": "1",
    }
    (tmp_path / "prom").mkdir()
    (tmp_path / "am").mkdir()
    with (
        ServerProcess(package=str(package), env=env, log_path=tmp_path / "server.log") as server,
        WebhookReceiver() as webhook,
        alertmanager(_test_alertmanager_config(webhook.url), tmp_path / "am") as am,
        prometheus(
            shipped_prometheus_config(
                target=f"127.0.0.1:{server.port}",
                rule_file=_test_rules(tmp_path),
                credentials_file=token,
                alertmanager=am.removeprefix("http://"),
            ),
            tmp_path / "prom",
        ) as prom,
    ):
        user = Client(server.port, key=KEY)
        scanner = Client(server.port, source=SCANNER)

        # /metrics needs a key like every other route; Prometheus scrapes with its own.
        wait_for_value(prom, 'up{job="dlpipe"}', 1.0)
        statuses: Counter[int] = Counter()
        status, _ = scanner.request("GET", "/metrics")
        assert status == 401
        statuses[status] += 1

        # --- A scanner and careless clients, next to real traffic that the model answers,
        # spread over several scrapes so that Prometheus sees the counters rise (a series that
        # first appears at its final value has no rate).
        for i in range(40):
            time.sleep(0.1)
            statuses[user.predict(_png(0))[0]] += 1  # dark: the model answers
            for path in ("/predict", "/metrics", "/.env", "/docs", "/v2/models"):
                statuses[scanner.request("GET", path)[0]] += 1
            bearer = {"Authorization": f"Bearer guess-{i}"}
            statuses[scanner.request("POST", "/predict", b"x", bearer)[0]] += 1
            statuses[user.request("GET", f"/wp-login-{i}.php")[0]] += 1
            statuses[user.predict(b"not an image")[0]] += 1
        for _ in range(5):
            user.hang_up_mid_body()
        # 401 until the address has spent its failed-key budget, 429 after; 404, 400 for the
        # key holder's mistakes. Not one server error.
        assert statuses[200] == 40 and statuses[404] == 40 and statuses[400] == 40, statuses
        assert statuses[401] >= 10 and statuses[401] + statuses[429] == 241, statuses
        assert not [s for s in statuses if s >= 500], statuses

        # Prometheus has it all, 499s included...
        wait_for_value(prom, 'sum(dlpipe_requests_total{status="499"})', 5.0)
        wait_for_value(prom, 'sum(dlpipe_requests_total{status=~"4..",status!="499"})', 321.0)
        wait_for_value(prom, 'sum(dlpipe_requests_total{endpoint="/predict",status="200"})', 40.0)
        # ...so a rule counting every error would page: the errors far outnumber the requests.
        naive = scalar(
            prom,
            "sum(rate(dlpipe_errors_total[5m]))"
            ' / sum(rate(dlpipe_requests_total{endpoint=~".*(predict|infer).*"}[5m]))',
        )
        assert naive is not None and naive > 1.0, naive
        # The shipped one stays silent past its `for` (2 s here) and several evaluations.
        time.sleep(4)
        assert query(prom, 'ALERTS{alertname="DlpipeHighErrorRate"}') == []
        assert webhook.posts == []

        # --- Now the model fails for real on every bright image: 500s, steadily (Prometheus
        # sees no increase in a series that first appears already at its final value).
        outage = threading.Event()
        failures: list[tuple[int, bytes]] = []

        def broken_traffic() -> None:
            while not outage.is_set():
                failures.append(user.predict(_png(255)))
                time.sleep(0.05)

        sender = threading.Thread(target=broken_traffic)
        sender.start()
        try:
            path, note, alert = webhook.wait_for("DlpipeHighErrorRate", "firing", timeout_s=60)
        finally:
            outage.set()
            sender.join()
        for status, body in failures:
            assert status == 500, body
            error = json.loads(body)["error"]
            assert error["type"] == "inference_failed"
            assert "Gather" not in error["message"]  # the runtime's detail stays in the log

        assert (path, note["receiver"]) == ("/dlpipe/oncall", "dlpipe-oncall")
        assert alert["labels"]["severity"] == "critical"
        assert alert["labels"]["project"] == "dlpipe"  # Prometheus' external label
        assert alert["annotations"]["summary"] == "dlpipe server error rate above 5%"
        ratio = scalar(prom, "dlpipe:server_error_ratio:rate5m")
        assert ratio is not None and ratio > 0.05
        print(f"\n{len(failures)} failed requests; server error ratio {ratio:.1%}; paged")
        # Only the alert that should fire did; nothing went to the team's receiver.
        assert {a["labels"]["alertname"] for _, _, a in webhook.alerts()} == {"DlpipeHighErrorRate"}


@needs_amtool
def test_the_email_and_slack_examples_in_the_docs_are_valid(tmp_path: Path) -> None:
    """docs/monitoring.md's receivers drop into the shipped config and pass amtool."""
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", doc, re.DOTALL) if "receivers:" in b]
    (block,) = blocks
    examples = yaml.safe_load(block)["receivers"]
    kinds = {key for r in examples for key in r if key.endswith("_configs")}
    assert kinds == {"email_configs", "slack_configs"}
    config = yaml.safe_load(AM_CONFIG.read_text())
    shipped = {r["name"] for r in config["receivers"]}
    assert {r["name"] for r in examples} <= shipped  # same names: they replace, routes hold
    config["receivers"] = examples + [r for r in config["receivers"] if r["name"] not in shipped]
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    result = _amtool("check-config", "alertmanager.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
