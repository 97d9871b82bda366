"""`dlpipe run` with a Keras config: train (TensorFlow workers) → register → optimize (tf2onnx +
INT8) → promote → serve → evaluate over HTTP, as the PyTorch run does; and when every export
fails, the trained Keras version itself serves from a TensorFlow worker process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import mlflow.tracking._tracking_service.utils as mlflow_tracking_utils
import pytest
from keras_helpers import KERAS_CONFIG

from dlpipe.config import load_config
from dlpipe.optimize.onnx_export import ExportError
from dlpipe.pipeline import run_pipeline

SMALL = [
    "data.limit_train_samples=2000",
    "data.limit_eval_samples=300",
    "training.num_epochs=1",
    "training.batch_size=64",
]


@pytest.mark.slow
def test_run_pipeline_with_keras_end_to_end(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "OMP_NUM_THREADS": "1",
        "DLPIPE_MODEL_CACHE": str(tmp_path / "cache"),
    }
    overrides = [*SMALL, f"training.checkpoint_dir={tmp_path / 'ckpt'}"]
    cmd = [
        sys.executable, "-m", "dlpipe.cli", "run", "-c", str(KERAS_CONFIG),
        *(a for o in overrides for a in ("-o", o)), "--eval-limit", "300", "--clients", "4",
        "--json",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)  # stdout is the summary alone
    variants = {v["variant"]: v for v in summary["variants"]}
    assert set(variants) == {"trained", "onnx", "int8"}
    assert variants["trained"]["framework"] == "tensorflow"
    assert variants["onnx"]["status"] == variants["int8"]["status"] == "kept"
    # The ONNX variant scores what Keras scored (parity within 1e-4 on the logits).
    assert variants["onnx"]["accuracy"] == pytest.approx(variants["trained"]["accuracy"], abs=0.005)
    promoted = next(v for v in summary["variants"] if v["version"] == summary["promoted_version"])
    assert promoted["variant"] in ("onnx", "int8")  # a Keras version has no model.onnx to serve
    served = summary["served"]
    assert served["requests"] == 300 and served["errors"] == 0
    assert served["versions"] == {summary["promoted_version"]: 300}
    # Same 300 test images, PNG round trip is lossless: the server scores what the variant did.
    assert served["accuracy"] == pytest.approx(promoted["accuracy"], abs=0.001)
    assert "dlpipe run: fashion_mnist_keras_cnn" in proc.stderr
    assert "served over HTTP" in proc.stderr and "FP32 ONNX export" in proc.stderr


@pytest.mark.slow
def test_keras_version_serves_itself_when_its_export_fails(
    tmp_path: Path, tmp_mlflow_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dlpipe.optimize.tf_export as tf_export

    def broken(*_: Any, **__: Any) -> Any:  # what tf2onnx does with an op it cannot convert
        raise ExportError("tf2onnx export failed: unsupported op FancyOp")

    monkeypatch.setattr(tf_export, "export_and_predict", broken)
    monkeypatch.setenv("DLPIPE_MODEL_CACHE", str(tmp_path / "cache"))
    # run_pipeline pins MLflow's process-wide tracking URI (`dlpipe run` is one process per
    # run); put MLflow's unset default back afterwards, or later tests' runs would land in
    # this test's deleted store while their registry follows the environment.
    monkeypatch.setattr(mlflow_tracking_utils, "_tracking_uri", None)
    cfg = load_config(KERAS_CONFIG, [*SMALL, f"training.checkpoint_dir={tmp_path / 'ckpt'}"])
    summary = run_pipeline(cfg, eval_limit=300, clients=4)
    status = {v.variant: v.status for v in summary.variants}
    assert status["onnx"].startswith("failed") and "FancyOp" in status["onnx"]
    assert status["int8"].startswith("failed")
    assert summary.promoted_version == summary.trained_version
    served = summary.served
    assert served is not None and served.errors == 0 and served.requests == 300
    assert served.versions == {summary.trained_version: 300}
    # The worker runs the trained model itself: the test split scores as training measured.
    trained = summary.variants[0]
    assert trained.framework == "tensorflow" and trained.accuracy is not None
    assert served.accuracy == pytest.approx(trained.accuracy, abs=0.001)
