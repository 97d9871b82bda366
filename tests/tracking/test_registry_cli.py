"""`dlpipe registry ...` against a real MLflow sqlite store: every subcommand, `--json`, and
every error path (non-zero exit, one line on stderr, nothing changed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import pytest
import torch

from dlpipe.config import PipelineConfig
from dlpipe.tracking.cli import main
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.package import save_model_package
from dlpipe.tracking.registry import ModelRegistry

NAME = "cli-model"


@pytest.fixture(scope="module")
def store(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store holding NAME with versions 1, 2, 3 (the CLI reads MLFLOW_TRACKING_URI)."""
    uri = module_mlflow_uri
    cfg = PipelineConfig()
    meta = ModelMetadata(
        NAME, "pytorch", "fp32", 0.01, datetime(2025, 3, 4, tzinfo=UTC), {"acc": 0.75},
        cfg.preprocessing,
    )  # fmt: skip
    pkg = save_model_package(tmp_path_factory.mktemp("pkg"), cfg, meta, net=torch.nn.Linear(3, 2))
    registry = ModelRegistry(uri)
    for _ in range(3):
        registry.register_model(pkg, meta)
    return uri


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out: str) -> Any:
    return json.loads(out.strip().splitlines()[-1])


def state(store: str) -> tuple[Any, ...]:
    registry = ModelRegistry(store)
    versions = [(r["version"], r["aliases"]) for r in registry.list_versions(NAME)]
    return versions, registry.get_ab_config(NAME), len(registry.history(NAME))


def test_list_and_show(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "list", NAME)
    assert code == 0 and "cli-model: 3 version(s)" in out and "acc=0.75" in out
    code, out, _ = run(capsys, "list", NAME, "--json")
    rows = last_json(out)
    assert code == 0 and [r["version"] for r in rows] == ["1", "2", "3"]
    assert all(r["framework"] == "pytorch" and "aliases" in r for r in rows)
    code, out, _ = run(capsys, "show", f"{NAME}:2", "--json")
    assert code == 0 and last_json(out)["version"] == "2"
    assert last_json(out)["training_date"].startswith("2025-03-04")
    code, out, _ = run(capsys, "show", NAME, "--json")  # latest
    assert code == 0 and last_json(out)["version"] == "3"
    code, out, _ = run(capsys, "show", NAME)
    assert code == 0 and "cli-model version 3" in out and "preprocessing_config" in out


def test_promote_ab_rollback_history(store: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "promote", NAME, "2", "--json")
    assert code == 0 and last_json(out) == {"model": NAME, "alias": "champion", "version": "2"}
    code, out, _ = run(capsys, "show", f"{NAME}@champion", "--json")
    assert last_json(out)["version"] == "2" and last_json(out)["aliases"] == ["champion"]

    code, out, _ = run(capsys, "ab", NAME, "--a", "2", "--b", "3", "--split", "0.9", "--json")
    assert code == 0 and last_json(out)["ab_config"] == {
        "model_a_version": "2",
        "model_b_version": "3",
        "traffic_split": 0.9,
    }
    code, out, _ = run(capsys, "ab", NAME, "--clear", "--json")
    assert code == 0 and last_json(out)["cleared"] is True
    code, out, _ = run(capsys, "ab", NAME, "--a", "2", "--b", "3", "--split", "0.5")
    assert code == 0 and "50.0%" in out

    code, out, _ = run(capsys, "rollback", NAME, "--to", "1", "--json")
    result = last_json(out)
    assert code == 0 and result["to"] == "1" and sorted(result["rolled_back_from"]) == ["2", "3"]
    assert ModelRegistry(store).get_model_for_request(NAME) == "1"

    code, out, _ = run(capsys, "history", NAME, "--json")
    actions = [(e["action"], e["to"]) for e in last_json(out)]
    assert code == 0 and actions[-5:] == [
        ("promote", "2"),
        ("ab_set", {"model_a_version": "2", "model_b_version": "3", "traffic_split": 0.9}),
        ("ab_clear", None),
        ("ab_set", {"model_a_version": "2", "model_b_version": "3", "traffic_split": 0.5}),
        ("rollback", "1"),
    ]
    code, out, _ = run(capsys, "history", NAME)
    assert code == 0 and "rollback" in out and "A=2 B=3 0.5" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "no-such-model"], "unknown model 'no-such-model'"),
        (["show", f"{NAME}:9"], "no version 9"),
        (["show", f"{NAME}@nobody"], "no alias 'nobody'"),
        (["promote", NAME, "9"], "no version 9"),
        (["promote", "no-such-model", "1"], "unknown model"),
        (["ab", NAME, "--a", "1", "--b", "9", "--split", "0.5"], "no version 9"),
        (["ab", NAME, "--a", "1", "--b", "2", "--split", "1.5"], "within [0, 1]"),
        (["ab", NAME, "--a", "1", "--b", "2", "--split", "-0.2"], "within [0, 1]"),
        (["ab", NAME, "--a", "1", "--b", "2", "--split", "lots"], "invalid float"),
        (["ab", NAME, "--a", "1", "--b", "1", "--split", "0.5"], "both 1"),
        (["ab", NAME, "--a", "1"], "--a, --b and --split together"),
        (["ab", NAME, "--clear", "--a", "1"], "either --clear"),
        (["rollback", NAME, "--to", "9"], "no version 9"),
        (["rollback", "no-such-model", "--to", "1"], "unknown model"),
        (["rollback", NAME], "required: --to"),
        (["history", "no-such-model", "--json"], "unknown model"),
        (["explode", NAME], "invalid choice"),
        ([], "required: command"),
    ],
)
def test_errors_exit_nonzero_with_one_line_and_change_nothing(
    store: str, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    before = state(store)
    code, out, err = run(capsys, *argv)
    assert code != 0
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert out == ""
    assert state(store) == before


def test_dlpipe_entry_point_in_a_real_process(store: str) -> None:
    """Through `dlpipe`'s own dispatch, in a fresh interpreter: MLflow's import-time logs and
    warnings must not add lines to the one-line error."""
    bad = subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", "registry", "show", f"{NAME}:42"],
        env=dict(os.environ, MLFLOW_TRACKING_URI=store), capture_output=True, text=True,
        timeout=180,
    )  # fmt: skip
    assert bad.stdout == ""
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        f"dlpipe registry: error: model '{NAME}' has no version 42"
    ]
