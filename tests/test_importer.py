"""`dlpipe import` of each format (.keras, SavedModel, .onnx, TorchScript): a registered version
that `dlpipe optimize` builds ONNX + INT8 variants of and `dlpipe serve` answers over HTTP.

Real conversions (tf2onnx in a TensorFlow subprocess, torch.onnx.export of a ScriptModule), a
real MLflow sqlite store, a real server. The models have random weights: what is checked is that
the imported version predicts what its source framework predicts, not how well.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dlpipe.config import load_config
from dlpipe.data import DataPreprocessor, build_datamodule
from dlpipe.evaluation import ServerProcess
from dlpipe.optimize.onnx_export import export_onnx
from dlpipe.optimize.variants import optimize_version
from dlpipe.tracking.package import load_package_config
from dlpipe.tracking.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fashion_mnist.yaml"
OVERRIDES = ["data.limit_train_samples=512", "data.limit_eval_samples=200"]
HAS_TF = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "tf2onnx", "keras"))
needs_tf = pytest.mark.skipif(not HAS_TF, reason="needs the [tensorflow] extra")


class TorchScriptCNN(nn.Module):
    """Conv, pooling and a linear head: ops the TorchScript ONNX exporter converts."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 7 * 7, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _torch_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return TorchScriptCNN().eval()


def _tf(code: str, cwd: Path) -> None:
    """Run TensorFlow code in its own process (this one has torch loaded)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def _keras_file(root: Path) -> Path:
    from dlpipe.models.keras_runner import keras_build

    return keras_build("keras_cnn", root / "model.keras", num_classes=10, seed=5)


def _saved_model(root: Path) -> Path:
    keras_path = _keras_file(root)
    code = (
        "import keras\n"
        f"keras.models.load_model({str(keras_path)!r}).export({str(root / 'saved')!r})\n"
    )
    _tf(code, root)
    return root / "saved"


def _onnx_file(root: Path) -> Path:
    # Its own names ("pixels" in, "scores" out): the import renames them to serving's.
    net = _torch_net(1)
    export_onnx(net, (torch.randn(2, 1, 28, 28),), root / "model.onnx", ["pixels"], ("scores",))
    return root / "model.onnx"


def _torchscript_file(root: Path) -> Path:
    torch.jit.save(torch.jit.script(_torch_net(2)), str(root / "model.pt"))
    return root / "model.pt"


def _source_logits(fmt: str, path: Path, x: np.ndarray) -> np.ndarray:
    """What the source framework itself predicts (TensorFlow in a subprocess)."""
    if fmt in ("keras", "saved_model"):
        from dlpipe.models.keras_runner import keras_predict

        return np.asarray(keras_predict(path, x))
    if fmt == "torchscript":
        with torch.inference_mode():
            return torch.jit.load(str(path))(torch.from_numpy(x)).numpy()
    from dlpipe.optimize.onnx_export import make_session

    return np.asarray(make_session(path).run(None, {"pixels": x})[0])


FORMATS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "keras": (_keras_file, "tensorflow"),
    "saved_model": (_saved_model, "tensorflow"),
    "onnx": (_onnx_file, "onnx"),
    "torchscript": (_torchscript_file, "pytorch"),
}


def _dlpipe(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dlpipe.cli", *args],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=600,
    )  # fmt: skip


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def test_split() -> tuple[Any, np.ndarray, list[np.ndarray]]:
    """The config's test split: preprocessed images, labels and the raw images."""
    cfg = load_config(CONFIG, OVERRIDES)
    dm = build_datamodule(cfg)
    raw = dm.raw_samples("test")
    pre = DataPreprocessor(cfg.preprocessing)
    images = [x for x, _ in raw]
    return pre.preprocess_inference_batch(images), np.array([y for _, y in raw]), images


@pytest.mark.slow
@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param("keras", marks=needs_tf),
        pytest.param("saved_model", marks=needs_tf),
        "onnx",
        "torchscript",
    ],
)
def test_import_optimize_and_serve(
    fmt: str,
    tmp_mlflow_uri: str,
    tmp_path: Path,
    test_split: tuple[Any, np.ndarray, list[np.ndarray]],
) -> None:
    make, framework = FORMATS[fmt]
    source = make(tmp_path)
    name = f"imported_{fmt}"
    args = ["import", str(source), "--name", name, "-c", str(CONFIG), "--json"]
    proc = _dlpipe([*args, *(a for o in OVERRIDES for a in ("-o", o))], tmp_path, tmp_mlflow_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)  # stdout is the JSON alone
    assert result["framework"] == framework and result["source_format"] == fmt
    assert result["details"]["max_abs_diff"] <= 1e-4  # parity on the first 100 test images

    # Its recorded accuracy is what the source framework scores on the same test split.
    x, labels, images = test_split
    source_logits = _source_logits(fmt, source, x)
    expected = float((source_logits.argmax(1) == labels).mean())
    assert result["metrics"]["test/acc"] == pytest.approx(expected, abs=1e-9)

    registry = ModelRegistry(tmp_mlflow_uri)
    version = result["version"]
    meta = registry.get_metadata(name, version)
    assert meta.framework == framework and meta.precision == "fp32" and meta.model_size_mb > 0
    assert meta.accuracy_metrics == result["metrics"]
    package = Path(registry.get_model(name, version))
    assert (package / "model.onnx").is_file()
    assert (package / "model.keras").is_file() == (fmt == "keras")
    assert load_package_config(package).model.num_classes == 10

    # Random weights: the gate is opened wide, the variants' accuracy is not what is tested.
    report = optimize_version(
        name, version, ["onnx", "int8"], 1.0, registry=registry, measure=False
    )
    variants = {v.target: v for v in report.variants}
    assert variants["int8"].status == "kept" and variants["int8"].version is not None
    if fmt == "keras":  # re-exported from model.keras, parity-checked against Keras
        assert variants["onnx"].status == "kept"
        assert variants["onnx"].details["exporter"] == "tf2onnx"
    else:  # the parent is already this ONNX graph
        assert variants["onnx"].status == "skipped" and "already" in variants["onnx"].reason
    int8 = registry.get_metadata(name, variants["int8"].version)
    assert int8.framework == "onnx" and int8.parent_version == version

    registry.promote(name, version)
    env = {"OMP_NUM_THREADS": "1", "DLPIPE_MODEL_CACHE": str(tmp_path / "cache")}
    with ServerProcess(model_name=name, tracking_uri=tmp_mlflow_uri, env=env) as server:
        files = {"file": ("x.png", _png(images[0][..., 0]), "image/png")}
        r = httpx.post(f"{server.url}/predict", files=files, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == version
    logits = source_logits[0]  # the served image is the split's first
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    top = body["predictions"][0]
    assert top["class_index"] == int(probs.argmax())
    assert top["probability"] == pytest.approx(float(probs.max()), abs=1e-4)


def test_import_without_data_config_serves_but_is_not_optimized(
    tmp_mlflow_uri: str, tmp_path: Path
) -> None:
    source = _onnx_file(tmp_path)
    pre = load_config(CONFIG).preprocessing.model_copy(update={"class_names": None})
    (tmp_path / "preprocessing.json").write_text(pre.model_dump_json())
    labels = ",".join(f"c{i}" for i in range(10))
    args = ["import", str(source), "--name", "bare", "--preprocessing", "preprocessing.json"]
    proc = _dlpipe([*args, "--labels", labels, "--json"], tmp_path, tmp_mlflow_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["metrics"] == {"import/unevaluated": 1.0}
    registry = ModelRegistry(tmp_mlflow_uri)
    package = Path(registry.get_model("bare", result["version"]))
    assert not (package / "config.yaml").exists()
    assert registry.get_metadata("bare", "1").preprocessing_config.class_names == labels.split(",")

    proc = _dlpipe(["optimize", "bare:1"], tmp_path, tmp_mlflow_uri)
    assert proc.returncode == 1
    assert "imported without a data config" in proc.stderr.strip().splitlines()[-1]

    wrong = ["import", str(source), "--name", "bare", "--preprocessing", "preprocessing.json"]
    proc = _dlpipe([*wrong, "--labels", "a,b,c"], tmp_path, tmp_mlflow_uri)
    assert proc.returncode == 1 and "3 class names for a model with 10 outputs" in proc.stderr


@pytest.mark.parametrize(
    ("files", "args", "status", "message"),
    [
        ({"model.h5": b"x"}, ["model.h5", "-c", str(CONFIG)], 2, "unknown model format '.h5'"),
        ({}, ["missing.onnx", "-c", str(CONFIG)], 2, "does not exist"),
        ({"dir/x.txt": b""}, ["dir", "-c", str(CONFIG)], 2, "not a SavedModel"),
        ({"m.onnx": b""}, ["m.onnx"], 2, "one of the arguments -c/--config --preprocessing"),
        ({"m.onnx": b""}, ["m.onnx", "-c", str(CONFIG), "--name", "a'b"], 2, "quotes"),
        ({"m.onnx": b"garbage"}, ["m.onnx", "-c", str(CONFIG)], 1, "not a valid ONNX model"),
    ],
)
def test_import_errors_are_one_line(
    files: dict[str, bytes],
    args: list[str],
    status: int,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    if "--name" not in args:
        args = [*args, "--name", "m"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["import", *args, *(a for o in OVERRIDES for a in ("-o", o))]
    if status == 2:  # refused before any work: the CLI's entry point, in this process
        from dlpipe import cli

        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.chdir(tmp_path)
        capsys.readouterr()
        code, err = cli.main(argv), capsys.readouterr().err
        assert code == status, err[-2000:]
        assert not (tmp_path / "mlflow.db").exists()
    else:  # the job starts and fails: a real process
        proc = _dlpipe(argv, tmp_path, uri)
        assert proc.returncode == status, proc.stderr[-2000:]
        err = proc.stderr
    [line] = err.strip().splitlines()
    assert line.startswith("dlpipe import: error:") and message in line, line


def test_a_state_dict_is_not_torchscript(tmp_path: Path, tmp_mlflow_uri: str) -> None:
    torch.save(_torch_net(0).state_dict(), tmp_path / "weights.pt")
    args = ["import", "weights.pt", "--name", "w", "-c", str(CONFIG)]
    proc = _dlpipe([*args, *(a for o in OVERRIDES for a in ("-o", o))], tmp_path, tmp_mlflow_uri)
    assert proc.returncode == 1
    assert "torch.jit.save(torch.jit.script(model), path)" in proc.stderr
    assert ModelRegistry(tmp_mlflow_uri).client.search_registered_models() == []
