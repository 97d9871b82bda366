"""CI: the image workflow builds every image and fails on fixable HIGH/CRITICAL vulnerabilities.

There is no Docker engine or GitHub runner here, so the workflow is read as data: these tests
keep its images, its scanner settings and its action pins from drifting silently.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "images.yml"


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return loaded


def _triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    # YAML 1.1 reads the bare key `on` as the boolean true.
    triggers: dict[str, Any] = workflow.get("on", workflow.get(True))
    return triggers


def _job(workflow: dict[str, Any]) -> dict[str, Any]:
    (job,) = workflow["jobs"].values()
    return dict(job)


def _step(job: dict[str, Any], action: str) -> tuple[int, dict[str, Any]]:
    (found,) = [
        (i, s) for i, s in enumerate(job["steps"]) if s.get("uses", "").startswith(f"{action}@")
    ]
    return found


def _resolve(value: object, entry: dict[str, Any]) -> str:
    """`${{ matrix.x }}` replaced by the matrix entry's value."""
    return re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m: str(entry[m.group(1)]), str(value))


def test_every_image_is_built(workflow: dict[str, Any]) -> None:
    job = _job(workflow)
    entries = job["strategy"]["matrix"]["include"]
    assert job["strategy"]["fail-fast"] is False
    _, build = _step(job, "docker/build-push-action")
    built = set()
    for entry in entries:
        dockerfile = _resolve(build["with"]["file"], entry)
        assert (ROOT / dockerfile).is_file(), dockerfile
        args = _resolve(build["with"]["build-args"], entry)
        built.add((dockerfile, args))
    # The CPU serving image, the training image and the CUDA serving image.
    assert built == {
        ("deploy/Dockerfile", "EXTRAS=serve"),
        ("deploy/Dockerfile", "EXTRAS=train"),
        ("deploy/Dockerfile.cuda", "EXTRAS=serve"),
    }
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for _, args in built:
        assert args.split("=", 1)[1] in extras["optional-dependencies"]
    tags = [_resolve(build["with"]["tags"], e) for e in entries]
    assert len(set(tags)) == len(tags), "each image its own tag: none overwrites another"
    assert build["with"]["context"] == "."  # the Dockerfiles COPY from the repository root
    assert build["with"]["load"] is True and build["with"]["push"] is False


def test_trivy_fails_on_fixable_high_and_critical_vulnerabilities(
    workflow: dict[str, Any],
) -> None:
    job = _job(workflow)
    build_index, build = _step(job, "docker/build-push-action")
    scan_index, scan = _step(job, "aquasecurity/trivy-action")
    assert scan_index > build_index, "scan what was just built"
    settings = scan["with"]
    assert "if" not in scan and not scan.get("continue-on-error", False)
    assert settings.get("scan-type", "image") == "image"
    assert settings["image-ref"] == build["with"]["tags"]  # the same image, in every matrix row
    assert str(settings["exit-code"]) == "1"
    assert settings["ignore-unfixed"] is True
    assert set(settings["severity"].split(",")) == {"HIGH", "CRITICAL"}
    assert set(settings.get("vuln-type", "os,library").split(",")) == {"os", "library"}


def test_actions_are_pinned_to_commits(workflow: dict[str, Any]) -> None:
    """A moved tag cannot change what runs: every action is pinned to a full commit SHA."""
    for step in _job(workflow)["steps"]:
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", step["uses"]), step["uses"]
    lines = [ln for ln in WORKFLOW.read_text().splitlines() if "uses:" in ln]
    assert all(re.search(r"#\s*v\d", ln) for ln in lines), "each pin names its version"


def test_runs_on_changes_weekly_and_with_read_only_permissions(workflow: dict[str, Any]) -> None:
    triggers = _triggers(workflow)
    assert {"push", "pull_request", "schedule", "workflow_dispatch"} <= set(triggers)
    # Whatever goes into an image triggers a scan of it.
    for event in ("push", "pull_request"):
        paths = triggers[event]["paths"]
        for needed in ("deploy/Dockerfile", "deploy/Dockerfile.cuda", "src/**", "pyproject.toml"):
            assert needed in paths, (event, needed)
    assert workflow["permissions"] == {"contents": "read"}
    checkout = _step(_job(workflow), "actions/checkout")[1]
    assert checkout["with"]["persist-credentials"] is False


def test_workflow_files_parse() -> None:
    for path in sorted(Path(ROOT / ".github" / "workflows").glob("*.y*ml")):
        loaded = yaml.safe_load(path.read_text())
        assert loaded["jobs"], path
