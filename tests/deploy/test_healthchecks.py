"""The images' and compose's health checks, run for real against `dlpipe serve`.

They are Python one-liners (the slim image has no curl). Each is run as the container would run
it against a server that requires API keys, once over plain HTTP and once with DLPIPE_SSL_*
set, when the server refuses plain HTTP: a check that only spoke HTTP would mark a healthy HTTPS
server unhealthy and have it restarted forever.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from deploy_helpers import DEPLOY, failing_package, stop

from dlpipe.evaluation import free_port
from tls_helpers import self_signed_certificate


def _dockerfile_check(name: str) -> str:
    """The Python code of a Dockerfile's HEALTHCHECK (exec form: CMD ["python", "-c", CODE])."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    (line,) = [ln for ln in text.splitlines() if ln.startswith("HEALTHCHECK")]
    argv = json.loads(line[line.index("CMD") + 3 :])
    assert argv[:2] == ["python", "-c"]
    code: str = argv[2]
    return code


def _compose_check() -> str:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    argv = compose["services"]["dlpipe"]["healthcheck"]["test"]
    assert argv[:3] == ["CMD", "python", "-c"]
    code: str = argv[3]
    return code


CHECKS = {
    "Dockerfile": _dockerfile_check("Dockerfile"),
    "Dockerfile.cuda": _dockerfile_check("Dockerfile.cuda"),
    "docker-compose.yml": _compose_check(),
}


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return failing_package(tmp_path_factory.mktemp("package"))


def _run_check(code: str, port: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # Compose's check names the container port 8000; here the server has a free port.
    code = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    return subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": os.environ.get("PATH", ""), "DLPIPE_PORT": str(port), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


@contextmanager
def _server(package: Path, env: dict[str, str], log: Path) -> Iterator[int]:
    """`dlpipe serve` configured by environment only, as in a container; yields its port."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DLPIPE_")}
    full_env |= {"OMP_NUM_THREADS": "1", "DLPIPE_PORT": str(port), "DLPIPE_LOG_LEVEL": "warning"}
    full_env |= {"DLPIPE_REQUIRE_AUTH": "true", "DLPIPE_API_KEYS": "k1"}
    full_env |= env
    cmd = [sys.executable, "-m", "dlpipe.cli", "serve", "--package", str(package)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield port
    finally:
        stop(proc)


def _until_healthy(code: str, port: int, env: dict[str, str], log: Path) -> None:
    deadline = time.monotonic() + 90
    while True:
        result = _run_check(code, port, env)
        if result.returncode == 0:
            return
        assert time.monotonic() < deadline, f"{result.stderr[-800:]}\n{log.read_text()[-2000:]}"
        time.sleep(0.5)


@pytest.mark.parametrize("source", sorted(CHECKS))
def test_health_checks_pass_over_http_and_over_https(
    source: str, package: Path, tmp_path: Path
) -> None:
    code = CHECKS[source]
    with _server(package, {}, tmp_path / "http.log") as port:
        _until_healthy(code, port, {}, tmp_path / "http.log")

    cert, key = self_signed_certificate(
        tmp_path, "dlpipe.example.com", ("dlpipe.example.com", "::1")
    )
    tls = {"DLPIPE_SSL_CERTFILE": str(cert), "DLPIPE_SSL_KEYFILE": str(key)}
    with _server(package, tls, tmp_path / "https.log") as port:
        _until_healthy(code, port, tls, tmp_path / "https.log")
        # The same check without knowing about TLS fails: the server refuses plain HTTP.
        assert _run_check(code, port, {}).returncode != 0
