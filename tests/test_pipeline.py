"""`dlpipe run` end to end on a small slice: train, register, optimize, promote, serve over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlpipe.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]


def test_cli_lists_commands_and_refuses_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    for name in ("run", "train", "registry", "optimize", "serve", "models"):
        assert name in out
    assert cli_main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_run_refuses_bad_config_before_work(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", "run", "-c", str(ROOT / "configs/fashion_mnist.yaml"),
         "-o", "training.learning_rate=-1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "training.learning_rate" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started or stored


@pytest.mark.slow
def test_run_pipeline_end_to_end(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    env = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{db}",
        "OMP_NUM_THREADS": "1",
        "DLPIPE_MODEL_CACHE": str(tmp_path / "cache"),
    }
    cmd = [
        sys.executable, "-m", "dlpipe.cli", "run", "-c", str(ROOT / "configs/fashion_mnist.yaml"),
        "-o", "training.num_epochs=1", "-o", "data.limit_train_samples=2000",
        "-o", "data.limit_eval_samples=500", "-o", f"training.checkpoint_dir={tmp_path / 'ckpt'}",
        "--eval-limit", "300", "--clients", "4", "--json",
    ]  # fmt: skip
    import os

    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **env}, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout is the summary alone
    variants = {v["variant"]: v for v in summary["variants"]}
    assert {"trained", "onnx", "int8"} <= set(variants)
    assert variants["trained"]["framework"] == "pytorch"
    served = summary["served"]
    assert served["requests"] == 300 and served["errors"] == 0
    # Every response came from the promoted version, and it answered as well as it scored offline.
    assert served["versions"] == {summary["promoted_version"]: 300}
    promoted = next(v for v in summary["variants"] if v["version"] == summary["promoted_version"])
    assert promoted["accuracy"] is not None and served["accuracy"] > 0.5
    assert "dlpipe run: fashion_mnist_cnn" in proc.stderr  # the table, beside the progress
