"""Kubernetes manifests: probes, limits, ConfigMap env, Service selector, HPA target."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dlpipe.serving.settings import ServeSettings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


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


def test_the_four_manifests_exist(manifests: dict[str, dict[str, Any]]) -> None:
    assert set(manifests) == {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler"}
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


def test_env_comes_from_the_configmap_and_is_valid_serve_settings(
    manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = manifests["ConfigMap"]
    refs = [e["configMapRef"]["name"] for e in _container(manifests)["envFrom"]]
    assert refs == [config["metadata"]["name"]]
    data = config["data"]
    fields = {f"DLPIPE_{name.upper()}" for name in ServeSettings.model_fields}
    unknown = {k for k in data if k.startswith("DLPIPE_")} - fields
    assert not unknown, f"ConfigMap keys ServeSettings does not know: {unknown}"
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = ServeSettings()
    assert settings.host == "0.0.0.0"
    assert settings.model_name == data["DLPIPE_MODEL_NAME"]
    assert settings.max_batch_size == int(data["DLPIPE_MAX_BATCH_SIZE"])


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


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_all_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(result.stdout)]
    assert sorted(kinds) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"]
