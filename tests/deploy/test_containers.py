"""Dockerfiles and docker-compose: structure checks (no Docker engine on the dev machine)."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dlpipe.serving.settings import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


@pytest.mark.parametrize(
    ("name", "base"), [("Dockerfile", "python:3.11-slim"), ("Dockerfile.cuda", "nvidia/cuda:")]
)
def test_dockerfile_is_multi_stage_non_root_with_healthcheck(name: str, base: str) -> None:
    instructions = _instructions(DEPLOY / name)
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1] for k, a in instructions if k == "ARG" and "=" in a
    }
    stages = _stages(instructions)
    assert len(stages) >= 2, "multi-stage: a build stage and a runtime stage"
    froms = [s[0][1] for s in stages]
    assert all(re.search(r"\bAS \w+", f, re.I) for f in froms), froms
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], f) for f in froms]
    assert all(r.startswith(base) for r in resolved), resolved
    final = stages[-1]
    keys = [k for k, _ in final]
    assert any(k == "COPY" and "--from=builder" in a for k, a in final), "runtime copies the build"
    assert "RUN" not in [k for k, a in final if "pip install" in a], "no pip install in runtime"
    users = [a for k, a in final if k == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "runs as non-root"
    assert keys.index("USER") < keys.index("ENTRYPOINT")
    (workdir,) = [a for k, a in final if k == "WORKDIR"]
    assert any(f"-o dlpipe -g dlpipe {workdir}" in a for k, a in final if k == "RUN"), (
        "the non-root user owns the working directory (checkpoints, mlruns)"
    )
    (healthcheck,) = [a for k, a in final if k == "HEALTHCHECK"]
    assert "/health" in healthcheck and "CMD" in healthcheck
    assert [a for k, a in final if k == "ENTRYPOINT"] == ['["dlpipe"]']
    assert [a for k, a in final if k == "CMD"] == ['["serve"]']
    assert "8000" in [a for k, a in final if k == "EXPOSE"]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfile_copies_only_paths_that_exist_and_pins_torch(name: str) -> None:
    instructions = _instructions(DEPLOY / name)
    for key, args in instructions:
        if key == "COPY" and "--from=" not in args:
            sources = [a for a in args.split() if not a.startswith("--")][:-1]
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY source {src} missing"
    text = (DEPLOY / name).read_text()
    # Training builds install torch themselves (CPU or CUDA wheels): always the project's pins.
    assert set(re.findall(r"\btorch==([\w.+]+)", text)) == {"2.14.1"}
    assert set(re.findall(r"\btorchvision==([\w.+]+)", text)) == {"0.29.1"}
    ignore = (DEPLOY / f"{name}.dockerignore").read_text()
    assert "**" in ignore.splitlines() and "!src/**" in ignore.splitlines()


def _builder_runs(name: str) -> tuple[dict[str, str], list[str]]:
    """The builder stage's ARG defaults and RUN commands."""
    builder = _stages(_instructions(DEPLOY / name))[0]
    args = dict(a.split("=", 1) for k, a in builder if k == "ARG" and "=" in a)
    return args, [a for k, a in builder if k == "RUN"]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_images_install_the_serve_extra_by_default_and_refuse_a_framework(name: str) -> None:
    args, runs = _builder_runs(name)
    assert args["EXTRAS"] == "serve"
    (install,) = [r for r in runs if 'pip install ".[${EXTRAS}]"' in r]
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(args["EXTRAS"].split(",")) <= set(extras["optional-dependencies"])
    # torch is installed only on the branch a training build takes.
    for run in runs:
        for line in run.split(";;"):
            if "torch==" in line:
                assert "*,train,*" in line, line
    # The serving build imports the server and fails if a training framework came along.
    probe = install[install.index('if [ "${EXTRAS}" = serve ]') :]
    assert "dlpipe.serving.app" in probe and "assert not bad" in probe
    assert all(f"'{m}'" in probe for m in ("torch", "lightning", "ray", "transformers"))


def test_cuda_image_swaps_in_onnxruntime_gpu() -> None:
    args, runs = _builder_runs("Dockerfile.cuda")
    assert args["ONNXRUNTIME_GPU"].startswith("onnxruntime-gpu==")
    (install,) = [r for r in runs if 'pip install ".[${EXTRAS}]"' in r]
    steps = [s.strip() for s in install.split("&&")]
    swap = steps.index("pip uninstall -y onnxruntime")
    assert steps[swap + 1] == 'pip install "${ONNXRUNTIME_GPU}"'
    assert steps.index('pip install ".[${EXTRAS}]"') < swap
    assert "CUDAExecutionProvider" in install


def test_cuda_image_installs_tensorrt_where_the_tensorrt_provider_finds_it() -> None:
    args, runs = _builder_runs("Dockerfile.cuda")
    assert args["TENSORRT"].startswith("tensorrt-cu12==")
    (install,) = [r for r in runs if 'pip install ".[${EXTRAS}]"' in r]
    steps = [s.strip() for s in install.split("&&")]
    trt = next(i for i, s in enumerate(steps) if 'pip install "${TENSORRT}"' in s)
    assert trt > steps.index('pip install "${ONNXRUNTIME_GPU}"')
    assert "libonnxruntime_providers_tensorrt.so" in install and "ldd" in install
    assert "not found" in install  # the build fails when the provider misses a TensorRT library
    runtime = _stages(_instructions(DEPLOY / "Dockerfile.cuda"))[-1]
    (env,) = [a for k, a in runtime if k == "ENV" and "LD_LIBRARY_PATH" in a]
    assert f"LD_LIBRARY_PATH={args['TRT_LIBS']}:" in env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


class UnsetRequired(Exception):
    """A `${VAR:?message}` whose variable is unset: compose refuses to start."""


_VARIABLE = re.compile(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}")


def interpolate(value: object, shell: dict[str, str] | None = None) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` against `shell` (default: none)."""
    shell = shell or {}

    def one(match: re.Match[str]) -> str:
        name, op, arg = match.groups()
        if shell.get(name):
            return shell[name]
        if op == ":?":
            raise UnsetRequired(f"{name}: {arg}")
        return arg if op == ":-" else ""

    return _VARIABLE.sub(one, str(value))


def _env_defaults(env: dict[str, Any], shell: dict[str, str] | None = None) -> dict[str, str]:
    """A service's environment as compose resolves it from `shell` (default: an unset shell)."""
    return {key: interpolate(value, shell) for key, value in env.items()}


def test_interpolate_follows_compose_rules() -> None:
    assert interpolate("${A:-x}:${B}") == "x:"
    assert interpolate("${A:-x}", {"A": "y"}) == "y"
    with pytest.raises(UnsetRequired, match="set it"):
        interpolate("${A:?set it}")
    assert interpolate("${A:?set it}", {"A": "v"}) == "v"


SERVICES = {"mlflow": 5000, "dlpipe": 8000, "prometheus": 9090, "alertmanager": 9093}
SERVICES |= {"grafana": 3000}


def test_compose_services_have_healthchecks_on_their_ports(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(SERVICES) <= set(services)
    for name, port in SERVICES.items():
        check = services[name]["healthcheck"]["test"]
        assert check[0] == "CMD" and f":{port}/" in " ".join(check), (name, check)
    assert "/health" in " ".join(services["dlpipe"]["healthcheck"]["test"])
    assert compose["services"]["dlpipe"]["depends_on"]["mlflow"]["condition"] == "service_healthy"


def test_compose_publishes_ports_on_localhost_unless_asked(compose: dict[str, Any]) -> None:
    services = compose["services"]
    # MLflow's server has no authentication: not published at all.
    assert "ports" not in services["mlflow"] and services["mlflow"]["expose"] == ["5000"]
    for name in ("dlpipe", "grafana", "prometheus", "alertmanager"):
        (published,) = services[name]["ports"]
        host, host_port, container_port = interpolate(published).split(":")
        assert host == "127.0.0.1", (name, published)  # an unset shell: loopback only
        assert int(host_port) == int(container_port) == SERVICES[name]
    # The operator may expose the server and Grafana (they authenticate) on purpose...
    for name, variable in (("dlpipe", "DLPIPE_BIND_ADDRESS"), ("grafana", "GRAFANA_BIND_ADDRESS")):
        (published,) = services[name]["ports"]
        assert interpolate(published, {variable: "0.0.0.0"}).startswith("0.0.0.0:")
    # ...but never Prometheus or Alertmanager, which have no authentication of their own.
    for name in ("prometheus", "alertmanager"):
        (published,) = services[name]["ports"]
        assert published.startswith("127.0.0.1:"), published
    ui = yaml.safe_load((DEPLOY / "docker-compose.mlflow-ui.yml").read_text())
    (published,) = ui["services"]["mlflow"]["ports"]
    assert interpolate(published) == "127.0.0.1:5000:5000"


def test_compose_has_no_default_password(compose: dict[str, Any]) -> None:
    env = compose["services"]["grafana"]["environment"]
    with pytest.raises(UnsetRequired, match="GRAFANA_ADMIN_PASSWORD"):
        _env_defaults(env)
    shell = {"GRAFANA_ADMIN_PASSWORD": "s3cret-from-env"}
    resolved = _env_defaults(env, shell)
    assert resolved["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret-from-env"
    assert resolved["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert not re.search(r"(PASSWORD|_KEYS?|TOKEN)\w*:-[^}]", text), "a secret with a default"


def test_compose_prometheus_has_no_admin_apis_and_scrapes_with_a_secret(
    compose: dict[str, Any],
) -> None:
    prometheus = compose["services"]["prometheus"]
    flags = " ".join(prometheus["command"])
    assert "--web.enable-lifecycle" not in flags and "--web.enable-admin-api" not in flags
    assert prometheus["secrets"] == ["dlpipe_metrics_key"]
    assert compose["secrets"]["dlpipe_metrics_key"] == {"environment": "DLPIPE_METRICS_KEY"}
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    (job,) = [j for j in scrape["scrape_configs"] if j["job_name"] == "dlpipe"]
    # Compose mounts a service's secret at /run/secrets/<name>.
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": "/run/secrets/dlpipe_metrics_key",
    }


def test_compose_mlflow_keeps_database_and_artifacts_on_volumes(compose: dict[str, Any]) -> None:
    mlflow = compose["services"]["mlflow"]
    cmd = " ".join(mlflow["command"])
    assert "--backend-store-uri=" in cmd and "--artifacts-destination=/mlflow/artifacts" in cmd
    mounts = {m.split(":")[1]: m.split(":")[0] for m in mlflow["volumes"]}
    assert mounts["/mlflow/artifacts"] in compose["volumes"]
    assert mounts["/mlflow/db"] in compose["volumes"]
    assert "sqlite:////mlflow/db/" in cmd


def _serve_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    """ServeSettings from exactly `env` (the test process's own DLPIPE_* removed)."""
    for key in list(os.environ):
        if key.startswith("DLPIPE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return ServeSettings()


def test_compose_env_configures_the_server_through_serve_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = compose["services"]["dlpipe"]["environment"]
    dlpipe_keys = {k for k in raw if k.startswith("DLPIPE_")}
    fields = {f"DLPIPE_{name.upper()}" for name in ServeSettings.model_fields}
    assert dlpipe_keys <= fields, f"unknown settings: {dlpipe_keys - fields}"
    # Without keys in the environment the server refuses to start: no silent open server.
    with pytest.raises(ValueError, match="require_auth"):
        _serve_settings(_env_defaults(raw), monkeypatch)
    shell = {"DLPIPE_API_KEYS": "k1,k2", "DLPIPE_METRICS_KEY": "scraper"}
    env = _env_defaults(raw, shell)
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    settings = _serve_settings(env, monkeypatch)  # the values compose passes are valid settings
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.model_name == "fashion_mnist_cnn"
    assert settings.tracking_uri == "http://mlflow:5000"
    assert settings.require_auth is True
    assert settings.api_keys == ["k1", "k2"]
    assert settings.metrics_api_keys == ["scraper"]  # Prometheus' key reads /metrics only
    assert settings.rate_limit is None


def test_compose_mounts_files_that_exist(compose: dict[str, Any]) -> None:
    for name in ("prometheus", "alertmanager", "grafana"):
        for mount in compose["services"][name]["volumes"]:
            src = mount.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts missing {src}"
    grafana_env = compose["services"]["grafana"]["environment"]
    shell = {"GRAFANA_ADMIN_PASSWORD": "x"}
    assert _env_defaults(grafana_env, shell)["PROMETHEUS_URL"] == "http://prometheus:9090"
    assert (
        "${PROMETHEUS_URL}"
        in (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )


def test_compose_builds_the_image_from_the_repository_root(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("mlflow", "dlpipe", "train"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["train"]["profiles"] == ["train"]
    # The server's image is [serve] only; MLflow's server (full mlflow) and training get [train].
    assert services["dlpipe"]["build"]["args"]["EXTRAS"] == "serve"
    for name in ("mlflow", "train"):
        assert "train" in services[name]["build"]["args"]["EXTRAS"].split(","), name
    # Different extras, different tags: one build must not overwrite the other's image.
    assert services["dlpipe"]["image"] != services["train"]["image"] == services["mlflow"]["image"]


def test_env_example_names_every_secret_the_stack_needs(compose: dict[str, Any]) -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    required = set(re.findall(r"\$\{(\w+):\?", text))
    required |= {s["environment"] for s in compose["secrets"].values() if "environment" in s}
    required.add("DLPIPE_API_KEYS")
    example = (DEPLOY / ".env.example").read_text()
    listed = set(re.findall(r"^(\w+)=$", example, re.MULTILINE))  # present, and left empty
    assert required <= listed, required - listed
    ignored = (DEPLOY / ".gitignore").read_text().splitlines()
    assert ".env" in ignored  # the filled-in copy never reaches git
