"""The contract every command keeps (docs/architecture.md, "Command line"), in real processes:
with `--json` the whole of stdout is one JSON document; exit status 0 success, 1 the job failed,
2 usage or configuration error with one line on stderr.

One tiny model is trained once for the module; optimize and registry work on it.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from dlpipe.cli_progress import StepProgress
from dlpipe.cli_support import EXIT_STATUS_HELP, json_text, parse_model_ref
from dlpipe.config import TrainingConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "fashion_mnist.yaml")
NAME = "fashion_mnist_cnn"
TINY = [
    "-o", "data.limit_train_samples=256", "-o", "data.limit_eval_samples=64",
    "-o", "training.batch_size=64", "-o", "training.num_epochs=1",
    "-o", "training.progress_bar=false", "-o", "optimize.calibration_samples=32",
]  # fmt: skip


@dataclass
class Done:
    code: int
    out: str
    err: str


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


def dlpipe(workdir: Path, *args: str, timeout: float = 300) -> Done:
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store}
    env.update(DLPIPE_MODEL_CACHE=str(workdir / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", *args],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    return Done(proc.returncode, proc.stdout, proc.stderr)


def dlpipe_here(
    workdir: Path,
    argv: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Done:
    """`dlpipe ARGV` through `dlpipe.cli.main` in this process, with `dlpipe()`'s environment."""
    from dlpipe import cli

    store = f"sqlite:///{workdir / 'mlflow.db'}"
    for name, value in {"MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store,
                        "DLPIPE_MODEL_CACHE": str(workdir / "cache")}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(workdir)
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return Done(code, out, err)


def json_out(done: Done) -> Any:
    assert done.code == 0, done.err[-3000:]
    return json.loads(done.out)  # the whole of stdout, not its last line


@pytest.fixture(scope="module")
def trained(workdir: Path) -> dict[str, Any]:
    ckpt = f"training.checkpoint_dir={workdir / 'ckpt'}"
    payload: dict[str, Any] = json_out(
        dlpipe(workdir, "train", "-c", CONFIG, *TINY, "-o", ckpt, "--json")
    )
    return payload


@pytest.mark.slow
def test_train_optimize_registry_json(workdir: Path, trained: dict[str, Any]) -> None:
    assert trained["model_name"] == NAME and trained["model_version"] == "1"
    assert set(trained) == {"run_id", "model_name", "model_version", "metrics", "checkpoint"}

    done = dlpipe(
        workdir, "optimize", f"{NAME}:1", "--targets", "onnx", "--limit-eval-samples", "32",
        "--no-latency", "--json",
    )  # fmt: skip
    report = json_out(done)
    assert [(v["target"], v["status"], v["version"]) for v in report["variants"]] == [
        ("onnx", "kept", "2")
    ]
    assert "onnx: done" in done.err  # progress, one plain line per step when not a terminal

    versions = json_out(dlpipe(workdir, "registry", "list", NAME, "--json"))
    assert [v["version"] for v in versions] == ["1", "2"]
    promoted = json_out(dlpipe(workdir, "registry", "promote", NAME, "2", "--json"))
    assert promoted == {"model": NAME, "alias": "champion", "version": "2"}
    shown = json_out(dlpipe(workdir, "registry", "show", f"{NAME}@champion", "--json"))
    assert shown["version"] == "2" and shown["framework"] == "onnx"
    history = json_out(dlpipe(workdir, "registry", "history", NAME, "--json"))
    assert history[-1]["action"] == "promote"


@pytest.mark.slow
def test_models_and_config_json(workdir: Path) -> None:
    assert json_out(dlpipe(workdir, "models", "--json"))["simple_cnn"] == "image_classification"
    keys = json_out(
        dlpipe(workdir, "config", "keys", "-c", CONFIG, "-o", "training.num_gpus=0", "--json")
    )
    rows = {row["key"]: row for row in keys}
    assert rows["training.num_gpus"] == {
        "key": "training.num_gpus",
        "type": "int, >= 0",
        "default": 0,
        "value": 0,
        # The field's own docstring (the schema's documentation is the CLI's help).
        "description": " ".join(
            (TrainingConfig.model_fields["num_gpus"].description or "").split()
        ),
    }
    assert rows["training.num_gpus"]["description"].startswith("GPUs to use")
    assert rows["tracking.registered_model_name"]["value"] == NAME
    assert {"model.name", "optimize.targets", "preprocessing.image_size"} <= set(rows)
    got = dlpipe(workdir, "config", "get", "optimize.targets", "-c", CONFIG, "--json")
    assert json_out(got) == ["onnx", "int8"]


@pytest.mark.slow
def test_run_json(workdir: Path) -> None:
    ckpt = f"training.checkpoint_dir={workdir / 'run-ckpt'}"
    done = dlpipe(
        workdir, "run", "-c", CONFIG, *TINY, "-o", ckpt, "-o", "optimize.targets=[onnx]",
        "--eval-limit", "10", "--clients", "2", "--json", timeout=600,
    )  # fmt: skip
    summary = json_out(done)
    assert summary["served"]["requests"] == 10 and summary["served"]["errors"] == 0
    assert f"dlpipe run: {NAME}" in done.err  # the summary table went to stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["optimize", f"{NAME}:99", "--targets", "onnx", "--json"], "has no version 99"),
        (["registry", "show", f"{NAME}:99", "--json"], "has no version 99"),
        (["registry", "promote", "no-such-model", "1"], "unknown model"),
        # Every image of the folder is unreadable: the job starts and cannot train.
        (["train", "-c", CONFIG, "-o", "data.source=image_folder", "-o", "model.num_classes=2",
          "-o", "data.path=unreadable", "--json"], "none of the 2 image files could be read"),
        (["run", "-c", CONFIG, "-o", "data.source=image_folder", "-o", "model.num_classes=2",
          "-o", "data.path=unreadable", "--json"], "none of the 2 image files could be read"),
    ],
)  # fmt: skip
def test_job_failures_exit_1(
    workdir: Path, trained: dict[str, Any], argv: list[str], message: str
) -> None:
    for name in ("a", "b"):
        (workdir / "unreadable" / name).mkdir(parents=True, exist_ok=True)
        (workdir / "unreadable" / name / "broken.png").write_bytes(b"not a png")
    done = dlpipe(workdir, *argv)
    assert done.code == 1, done.err[-3000:]
    assert done.out == ""
    last = done.err.strip().splitlines()[-1]
    assert last.startswith(f"dlpipe {argv[0]}: error:") and message in last, last


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "-c", CONFIG, "--epochs", "3"], "unrecognized arguments: --epochs"),
        (["train", "-c", CONFIG, "-o", "training.lerning_rate=0.1", "--json"], "unknown key"),
        (["optimize", f"{NAME}:1:2", "--json"], "NAME@alias or NAME:version"),
        (["optimize", NAME, "--targets", "onnx,int4"], "(got 'int4')"),
        (["registry", "show", f"{NAME}:latest", "--json"], "NAME@alias or NAME:version"),
        (["registry", "ab", NAME, "--split", "2"], "must be within [0, 1]"),
        (["run", "-c", CONFIG, "-o", "training.learning_rate=-1", "--json"], "learning_rate"),
        (["models", "--task", "audio"], "invalid choice"),
        (["config", "keys", "-o", "nope.key=1"], "nope: unknown key"),
        (["config", "get", "training.nope", "-c", CONFIG], "unknown key 'training.nope'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    workdir: Path,
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The first case crosses the process boundary (`python -m dlpipe.cli`); the others call the
    # same entry point in this process, which already has the stacks a command imports.
    if argv[:3] == ["train", "-c", CONFIG] and "--epochs" in argv:
        done = dlpipe(workdir, *argv)
    else:
        done = dlpipe_here(workdir, argv, monkeypatch, capsys)
    assert done.code == 2, done.err[-3000:]
    assert done.out == ""
    lines = done.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dlpipe {argv[0]}"), lines
    assert message in lines[0]


def test_a_missing_extra_is_one_line_naming_it(workdir: Path) -> None:
    # A `[serve]`-only install: no torch, no Lightning.
    code = "import sys; sys.modules.update(torch=None, lightning=None); from dlpipe.cli import main"
    for argv, status in (
        (["optimize", "-h"], 2),
        (["train", "-c", CONFIG], 2),
        (["train", "-h"], 0),
    ):
        proc = subprocess.run(
            [sys.executable, "-c", f"{code}; sys.exit(main({argv!r}))"],
            cwd=workdir, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == status, proc.stderr
        if status == 2:  # torch or lightning, whichever the command imports first
            [line] = proc.stderr.strip().splitlines()
            assert line.startswith(f"dlpipe {argv[0]}: needs the Python package '"), line
            assert line.endswith("; install it: pip install 'dlpipe[train]'"), line


def test_help_states_the_exit_statuses(capsys: pytest.CaptureFixture[str]) -> None:
    from dlpipe.cli import COMMANDS, main

    for name in COMMANDS:
        if name == "serve":  # its own flags, already documented (0 / 1 / 2)
            continue
        assert main([name, "-h"]) == 0
        assert EXIT_STATUS_HELP in capsys.readouterr().out, name


def test_make_serve_serves_what_make_run_registered(tmp_path: Path) -> None:
    """The Makefile asks the config for the registered name (else the experiment name, as
    training does) and the store; a stand-in `dlpipe serve` prints what it was given."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    fake = venv / "bin" / "dlpipe"
    real = Path(sys.executable).parent / "dlpipe"
    cli = f'"{real}"' if real.exists() else f'"{sys.executable}" -m dlpipe.cli'
    fake.write_text(f'#!/bin/sh\n[ "$1" = serve ] && {{ echo "$@"; exit 0; }}\nexec {cli} "$@"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    stamp = venv / "stamp"
    stamp.touch()  # newer than pyproject.toml: nothing is installed
    unnamed = tmp_path / "unnamed.yaml"
    unnamed.write_text(
        "training:\n  experiment_name: my_experiment\ntracking:\n  tracking_uri: sqlite:///x.db\n"
    )

    def make_serve(config: str) -> str:
        proc = subprocess.run(
            ["make", "-s", "serve", f"VENV={venv}", f"STAMP={stamp}", f"CONFIG={config}"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().splitlines()[-1]

    assert make_serve(CONFIG) == f"serve --model {NAME}"
    assert make_serve(str(unnamed)) == "serve --model my_experiment --tracking-uri sqlite:///x.db"


def test_model_references_and_strict_json() -> None:
    assert parse_model_ref("cnn") == ("cnn", None)
    assert parse_model_ref("cnn@champion") == ("cnn", "champion")
    assert parse_model_ref("cnn:3") == ("cnn", "3")
    with pytest.raises(ValueError, match="NAME@alias"):
        parse_model_ref("cnn@")
    assert json_text({"loss": float("nan"), "acc": [float("inf"), 0.5]}) == (
        '{"acc": [null, 0.5], "loss": null}'
    )


def test_progress_is_plain_lines_off_a_terminal() -> None:
    stream = io.StringIO()
    progress = StepProgress(
        "dlpipe optimize", {"*": ("build", "evaluate")}, console=Console(file=stream)
    )
    with progress:
        progress("int8", "build")
        progress("int8", "done")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("dlpipe optimize: [")
    assert lines[0].endswith("int8: build") and lines[1].endswith("int8: done")
