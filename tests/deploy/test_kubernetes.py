"""Kubernetes manifests: probes, limits, settings, auth, shutdown, Ingress, HPA, monitoring."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY, PROMTOOL

from dlpipe.serving.settings import ServeSettings

K8S = DEPLOY / "k8s"
MONITORING = K8S / "monitoring"
KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
            docs[doc["kind"]] = doc
    return docs


def _container(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def test_the_five_manifests_exist(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "Ingress",
    }
    assert manifests["Deployment"]["apiVersion"] == "apps/v1"
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


def test_probes_hit_health_and_ready_on_the_served_port(
    manifests: dict[str, dict[str, Any]],
) -> None:
    c = _container(manifests)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["startupProbe"]["httpGet"]["path"] == "/health"
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        port = c[probe]["httpGet"]["port"]
        assert ports.get(port, port) == 8000, probe
    config = manifests["ConfigMap"]["data"]
    assert int(config["DLPIPE_PORT"]) == 8000
    annotations = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert annotations["prometheus.io/port"] == "8000"


def test_resources_have_requests_and_limits(manifests: dict[str, dict[str, Any]]) -> None:
    resources = _container(manifests)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    assert float(resources["requests"]["cpu"]) <= float(resources["limits"]["cpu"])


def test_runs_as_non_root_without_service_link_env(manifests: dict[str, dict[str, Any]]) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["enableServiceLinks"] is False  # else DLPIPE_PORT=tcp://... breaks the settings
    assert _container(manifests)["securityContext"]["allowPrivilegeEscalation"] is False


SECRETS = {("dlpipe-api-keys", "keys"): "client-1,client-2", ("dlpipe-api-keys", "metrics"): "m"}


def _pod_env(
    manifests: dict[str, dict[str, Any]], secrets: dict[tuple[str, str], str]
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom, then env in order with
    `$(VAR)` references expanded; a missing non-optional Secret key fails the pod."""
    container = _container(manifests)
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        assert source["configMapRef"]["name"] == manifests["ConfigMap"]["metadata"]["name"]
        env.update(manifests["ConfigMap"]["data"])
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"]
            )
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        value = secrets.get((ref["name"], ref["key"]))
        if value is None:
            if ref.get("optional", False):
                continue
            raise LookupError(f"CreateContainerConfigError: secret {ref['name']}/{ref['key']}")
        env[var["name"]] = value
    return env


def _settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    for key in list(os.environ):
        if key.startswith("DLPIPE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ServeSettings()


def test_env_comes_from_the_configmap_and_is_valid_serve_settings(
    manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = manifests["ConfigMap"]["data"]
    fields = {f"DLPIPE_{name.upper()}" for name in ServeSettings.model_fields}
    env = _pod_env(manifests, SECRETS)
    unknown = {k for k in env if k.startswith("DLPIPE_")} - fields
    assert not unknown, f"settings ServeSettings does not know: {unknown}"
    settings = _settings(env, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.model_name == data["DLPIPE_MODEL_NAME"]
    assert settings.max_batch_size == int(data["DLPIPE_MAX_BATCH_SIZE"])


def test_auth_is_required_and_a_missing_secret_fails_the_pod(
    manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(_pod_env(manifests, SECRETS), monkeypatch)
    assert settings.require_auth is True
    assert settings.api_keys == ["client-1", "client-2"]
    assert settings.metrics_api_keys == ["m"]  # Prometheus' key reads /metrics only
    # A missing Secret (or key) keeps the container from starting instead of dropping auth.
    for missing in SECRETS:
        with pytest.raises(LookupError, match="CreateContainerConfigError"):
            _pod_env(manifests, {k: v for k, v in SECRETS.items() if k != missing})
    # An empty key list (an empty Secret value) is refused by the server itself.
    empty = dict.fromkeys(SECRETS, "")
    with pytest.raises(ValueError, match="require_auth"):
        _settings(_pod_env(manifests, empty), monkeypatch)
    # REQUIRE_AUTH is pinned in the Deployment, where the ConfigMap cannot override it.
    assert "DLPIPE_REQUIRE_AUTH" not in manifests["ConfigMap"]["data"]
    (pinned,) = [e for e in _container(manifests)["env"] if e["name"] == "DLPIPE_REQUIRE_AUTH"]
    assert pinned["value"] == "true"


def test_termination_grace_covers_prestop_drain_and_shutdown(
    manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    command = _container(manifests)["lifecycle"]["preStop"]["exec"]["command"]
    # The image has no `sleep` or shell utilities: its Python sleeps.
    assert command[:2] == ["python", "-c"]
    (seconds,) = re.findall(r"^import time; time\.sleep\((\d+(?:\.\d+)?)\)$", command[2])
    assert float(seconds) >= 5, "long enough for endpoints to drop the pod everywhere"
    settings = _settings(_pod_env(manifests, SECRETS), monkeypatch)
    needed = float(seconds) + settings.drain_s + settings.shutdown_grace_s
    margin = pod["terminationGracePeriodSeconds"] - needed
    assert 3 <= margin <= 30, f"grace {pod['terminationGracePeriodSeconds']} s for {needed} s"


def test_ingress_serves_the_api_over_tls_only(
    manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    ingress = manifests["Ingress"]
    assert ingress["apiVersion"] == "networking.k8s.io/v1"
    annotations = ingress["metadata"]["annotations"]
    assert annotations["cert-manager.io/cluster-issuer"]
    assert annotations["nginx.ingress.kubernetes.io/force-ssl-redirect"] == "true"
    spec = ingress["spec"]
    (tls,) = spec["tls"]
    assert tls["secretName"]
    (rule,) = spec["rules"]
    assert rule["host"] in tls["hosts"]
    service = manifests["Service"]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    paths = rule["http"]["paths"]
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in port_names
    routed = {p["path"] for p in paths}
    assert {"/predict", "/v2"} <= routed
    # Operations stay inside the cluster: no path the ingress routes reaches /metrics.
    for path in paths:
        prefix = path["path"] if path["pathType"] == "Prefix" else None
        assert path["path"] != "/metrics" and not (prefix and "/metrics".startswith(prefix))
    # The proxy lets through every body the server accepts (it answers 413 itself).
    body = annotations["nginx.ingress.kubernetes.io/proxy-body-size"]
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    limit = int(body[:-1]) * units[body[-1].lower()]
    assert limit >= _settings(_pod_env(manifests, SECRETS), monkeypatch).max_upload_bytes


def test_service_selects_the_deployment_pods(manifests: dict[str, dict[str, Any]]) -> None:
    service = manifests["Service"]["spec"]
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()
    selector = manifests["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    port_names = {p["name"] for p in _container(manifests)["ports"]}
    assert all(p["targetPort"] in port_names for p in service["ports"])


def test_hpa_targets_the_deployment(manifests: dict[str, dict[str, Any]]) -> None:
    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    deployment = manifests["Deployment"]
    assert target["kind"] == "Deployment"
    assert target["name"] == deployment["metadata"]["name"]
    assert target["apiVersion"] == deployment["apiVersion"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    assert "cpu" in _container(manifests)["resources"]["requests"]  # utilization needs requests


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kustomize_renders_all_manifests() -> None:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Ingress", "Service"]
    assert sorted(kinds) == expected


# ------------------------------------------------------------- Prometheus and Alertmanager


@pytest.fixture(scope="module")
def monitoring() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((MONITORING / name).read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _pod_spec(monitoring: dict[tuple[str, str], dict[str, Any]], name: str) -> dict[str, Any]:
    spec: dict[str, Any] = monitoring[("Deployment", name)]["spec"]["template"]["spec"]
    return spec


def test_monitoring_copies_equal_their_originals() -> None:
    """kustomize reads no file outside its directory, so these are copies: never drifting."""
    assert (MONITORING / "alerts.yml").read_text() == (DEPLOY / "prometheus/alerts.yml").read_text()
    original = (DEPLOY / "alertmanager/alertmanager.yml").read_text()
    assert (MONITORING / "alertmanager.yml").read_text() == original
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    (config_map,) = kustomization["configMapGenerator"]
    assert sorted(config_map["files"]) == ["alerts.yml", "prometheus.yml"]
    (secret,) = kustomization["secretGenerator"]
    assert secret["files"] == ["alertmanager.yml"]


def test_prometheus_scrapes_the_pods_with_the_metrics_key_from_the_secret(
    manifests: dict[str, dict[str, Any]], monitoring: dict[tuple[str, str], dict[str, Any]]
) -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dlpipe"]
    assert job["metrics_path"] == "/metrics"
    credentials = Path(job["authorization"]["credentials_file"])
    assert job["authorization"]["type"] == "Bearer"
    pod = _pod_spec(monitoring, "prometheus")
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(credentials.parent)]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert secret["optional"] is False
    (item,) = secret["items"]  # the scraper's key only, never the clients' keys
    assert item["path"] == credentials.name
    # The very Secret key the server takes as DLPIPE_METRICS_API_KEYS.
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in _container(manifests)["env"]
        if "valueFrom" in e
    }
    assert (secret["secretName"], item["key"]) in refs
    # It finds the dlpipe pods of its namespace and scrapes their `http` port.
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"] == {"own_namespace": True}
    labels = manifests["Deployment"]["spec"]["template"]["metadata"]["labels"]
    (selector,) = sd["selectors"]
    key, value = selector["label"].split("=")
    assert labels[key] == value
    (keep,) = [r for r in job["relabel_configs"] if r.get("action") == "keep"]
    assert keep["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
    assert keep["regex"] in {p["name"] for p in _container(manifests)["ports"]}
    # Reading pods of its own namespace is all it may do.
    (rule,) = monitoring[("Role", "prometheus")]["rules"]
    assert rule["resources"] == ["pods"] and rule["verbs"] == ["get", "list", "watch"]
    assert pod["serviceAccountName"] == "prometheus"


def test_prometheus_alerts_through_the_alertmanager_service(
    monitoring: dict[tuple[str, str], dict[str, Any]],
) -> None:
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    (am,) = config["alerting"]["alertmanagers"]
    (target,) = am["static_configs"][0]["targets"]
    host, port = target.split(":")
    service = monitoring[("Service", host)]
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert config["rule_files"] == ["alerts.yml"]
    (prom,) = _pod_spec(monitoring, "prometheus")["containers"]
    assert "--web.enable-lifecycle" not in prom["args"]
    assert "--web.enable-admin-api" not in prom["args"]
    (alertmanager,) = _pod_spec(monitoring, "alertmanager")["containers"]
    assert "--cluster.listen-address=" in alertmanager["args"]
    for kind, name in monitoring:
        if kind == "Service":
            assert monitoring[(kind, name)]["spec"]["type"] == "ClusterIP", name


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (`make system-deps`)")
def test_promtool_checks_the_kubernetes_prometheus_config(tmp_path: Path) -> None:
    """Debian's promtool is built without Kubernetes service discovery, so the pod discovery
    (checked structurally above) becomes a static target here; the rest is checked as shipped."""
    assert PROMTOOL is not None
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            del job["kubernetes_sd_configs"]
            job["static_configs"] = [{"targets": ["dlpipe:8000"]}]
        if "authorization" in job:
            token = tmp_path / "metrics"
            token.write_text("key")
            job["authorization"]["credentials_file"] = str(token)
    shutil.copy(MONITORING / "alerts.yml", tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [PROMTOOL, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_kustomize_renders_the_monitoring_stack() -> None:
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    docs = list(yaml.safe_load_all(result.stdout))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Deployment",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "Service",
        "ServiceAccount",
    ]
    # Generated names carry a content hash; the Deployments must refer to those names.
    by_kind = {d["kind"]: d for d in docs if d["kind"] in ("ConfigMap", "Secret")}
    volumes = [
        v
        for d in docs
        if d["kind"] == "Deployment"
        for v in d["spec"]["template"]["spec"]["volumes"]
    ]
    names = {v.get("configMap", {}).get("name") for v in volumes}
    names |= {v.get("secret", {}).get("secretName") for v in volumes}
    assert by_kind["ConfigMap"]["metadata"]["name"] in names
    assert by_kind["Secret"]["metadata"]["name"] in names
    assert by_kind["ConfigMap"]["metadata"]["name"].startswith("prometheus-config-")
