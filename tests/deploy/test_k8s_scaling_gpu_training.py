"""deploy/k8s beyond the base: the load-based HPA and its adapter rules, the GPU variant of the
Deployment, the multi-node training Job."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import DEPLOY

from dlpipe.config import load_config
from dlpipe.monitoring.metrics import METRIC_NAMES

K8S = DEPLOY / "k8s"
KUBECTL = shutil.which("kubectl")


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_load_hpa_scales_the_deployment_on_requests_queue_and_cpu() -> None:
    (hpa,) = load(K8S / "autoscaling" / "hpa.yaml")
    (base,) = load(K8S / "hpa.yaml")
    assert hpa["metadata"]["name"] == base["metadata"]["name"]  # applying it replaces the base
    assert hpa["spec"]["scaleTargetRef"] == base["spec"]["scaleTargetRef"]
    pods = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert pods == {"dlpipe_requests_per_second", "dlpipe_queue_depth"}
    (cpu,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu["resource"]["name"] == "cpu"  # the fallback when the adapter cannot answer


def test_adapter_rules_publish_what_the_hpa_reads_from_real_series() -> None:
    rules = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter.yaml").read_text())
    custom = rules["rules"]["custom"]
    published = {rule["name"]["as"] for rule in custom}
    (hpa,) = load(K8S / "autoscaling" / "hpa.yaml")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted <= published
    exposed = set(METRIC_NAMES)  # what the server's /metrics carries
    for rule in custom:
        series = re.match(r"(\w+)\{", rule["seriesQuery"])
        assert series is not None and series.group(1) in exposed, rule["seriesQuery"]
        # Per pod: the scrape labels every series with namespace and pod (monitoring config).
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    monitoring = (K8S / "monitoring" / "prometheus.yml").read_text()
    assert "target_label: namespace" in monitoring and "target_label: pod" in monitoring


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_gpu_variant_patches_the_deployment(tmp_path: Path) -> None:
    assert KUBECTL is not None
    (tmp_path / "base").symlink_to(K8S)
    shutil.copyfile(K8S / "gpu" / "deployment-gpu.yaml", tmp_path / "deployment-gpu.yaml")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [base]\npatches:\n  - path: deployment-gpu.yaml\n"
    )
    rendered = subprocess.run(
        [KUBECTL, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    (deployment,) = [d for d in yaml.safe_load_all(rendered.stdout) if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].endswith("-cuda")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DLPIPE_DEVICE"] == "cuda" and "DLPIPE_API_KEYS" in env  # base env kept
    assert pod["nodeSelector"] and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"  # base probes kept


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed")
def test_training_job_agrees_with_its_config() -> None:
    assert KUBECTL is not None
    rendered = subprocess.run(
        [KUBECTL, "kustomize", str(K8S / "training")], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered.stdout)}
    job, service = docs["Job"], docs["Service"]
    cfg = load_config(K8S / "training" / "train.yaml")
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == cfg.training.num_nodes
    (container,) = job["spec"]["template"]["spec"]["containers"]
    command = container["args"][0]
    assert f"--nnodes={cfg.training.num_nodes}" in command
    assert f"--nproc-per-node={cfg.training.num_gpus}" in command
    assert container["resources"]["limits"]["nvidia.com/gpu"] == cfg.training.num_gpus
    assert '--node-rank="${JOB_COMPLETION_INDEX}"' in command
    # The rendezvous host is pod 0's name under the headless Service.
    assert service["spec"]["clusterIP"] == "None"
    assert job["spec"]["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert f"--master-addr={job['metadata']['name']}-0.{service['metadata']['name']}" in command
