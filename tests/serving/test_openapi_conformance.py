"""Schema-driven fuzzing of a real `dlpipe serve` over HTTP: the schemathesis CLI with every
check and every phase (examples, coverage, fuzzing, stateful), positive and negative data.

The server's own OpenAPI document drives the requests; every response must conform to it (status
codes, content types, bodies) and no request may cause a server error. `schemathesis_hooks.py`
teaches it that an upload's `format: binary` is an image for this service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dlpipe.evaluation import ServerProcess

pytest.importorskip("schemathesis", reason="make test installs schemathesis")
HERE = Path(__file__).resolve().parent


def test_every_operation_conforms_to_its_own_document(cnn_package: Path, tmp_path: Path) -> None:
    env = {"DLPIPE_MODEL_NAME": "fashion", "DLPIPE_ACCESS_LOG": "false"}
    with ServerProcess(package=str(cnn_package), env=env, log_path=tmp_path / "s.log") as server:
        cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
        command = [cli, "--config-file", str(HERE / "schemathesis.toml"), "run"]
        command += [f"{server.url}/openapi.json", "--checks", "all", "--mode", "all"]
        command += ["--max-examples", "40", "--seed", "1", "--workers", "1", "--no-color"]
        run = subprocess.run(
            command,
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
                "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
            },
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=900,
        )
    report = run.stdout
    print(report[-3000:])
    failures = report[report.find("FAILURES") :] if "FAILURES" in report else report[-6000:]
    assert run.returncode == 0, failures[:12000] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or "passed" in run.stdout.lower()
