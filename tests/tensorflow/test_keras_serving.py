"""A Keras-only version served by `dlpipe serve`: the model runs in a TensorFlow worker process
beside the server, never in it (read from /proc/<pid>/maps), is restarted when it dies and ends
when its version retires."""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from keras_helpers import KERAS_CONFIG
from PIL import Image

from dlpipe.config import load_config
from dlpipe.data import DataPreprocessor
from dlpipe.evaluation import ServerProcess
from dlpipe.models.keras_runner import (
    encode_frame,
    keras_build,
    keras_predict,
    read_frame,
    stream_reader,
)
from dlpipe.optimize.tf_export import export_keras_package
from dlpipe.serving.engine import InferenceEngine, ModelLoadError, ShapeMismatchError
from dlpipe.serving.keras_engine import (
    START_TIMEOUT_S,
    KerasInputError,
    KerasWorker,
    KerasWorkerError,
)
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.package import load_package_metadata, save_model_package
from dlpipe.tracking.registry import ModelRegistry

SERVER_ENV = {"OMP_NUM_THREADS": "1", "DLPIPE_REGISTRY_REFRESH_S": "0.5"}


def _metadata(framework: str = "tensorflow") -> ModelMetadata:
    cfg = load_config(KERAS_CONFIG)
    return ModelMetadata(
        model_name="keras_served",
        framework=framework,  # type: ignore[arg-type]
        precision="fp32",
        model_size_mb=0.0,
        training_date=utc_now(),
        accuracy_metrics={"test/acc": 0.5},
        preprocessing_config=cfg.preprocessing,
    )


@pytest.fixture(scope="module")
def keras_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A package holding only model.keras (random keras_cnn weights): what a Keras version
    whose ONNX export failed looks like."""
    root = tmp_path_factory.mktemp("keras-serving")
    model = keras_build("keras_cnn", root / "model.keras", num_classes=10, seed=4)
    package = save_model_package(
        root / "package", load_config(KERAS_CONFIG), _metadata(), keras_path=model
    )
    assert not (package / "model.onnx").exists() and not (package / "MLmodel").exists()
    return package


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _expected_top1(package: Path, image: np.ndarray) -> tuple[int, float]:
    """Class and probability Keras itself gives (in its own subprocess)."""
    pre = DataPreprocessor(load_config(KERAS_CONFIG).preprocessing)
    logits = keras_predict(package / "model.keras", pre.preprocess_inference_batch([image]))[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    return int(probs.argmax()), float(probs.max())


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (int(c) for c in (task / "children").read_text().split()):
            out += [child, *_descendants(child)]
    return out


def _maps_tensorflow(pid: int) -> bool:
    """Whether a process has TensorFlow's shared libraries mapped (it imported tensorflow)."""
    return "libtensorflow" in Path(f"/proc/{pid}/maps").read_text()


def _is_keras_worker(pid: int) -> bool:
    return b"dlpipe.models.keras_runner" in Path(f"/proc/{pid}/cmdline").read_bytes()


def _tensorflow_processes(server_pid: int) -> tuple[list[int], list[int]]:
    """(Keras workers in the server's process tree, its other processes that map TensorFlow):
    the server itself, and any process it forks to answer HTTP, must be in neither."""
    tree = [server_pid, *_descendants(server_pid)]
    workers = [p for p in tree if _is_keras_worker(p)]
    leaks = [p for p in tree if p not in workers and _maps_tensorflow(p)]
    return workers, leaks


def _predict(url: str, png: bytes) -> dict:  # type: ignore[type-arg]
    r = httpx.post(f"{url}/predict", files={"file": ("x.png", png, "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_frames_round_trip_arrays_without_pickles() -> None:
    arrays: dict[str, np.ndarray] = {
        "input_ids": np.arange(12, dtype=np.int64).reshape(3, 4),
        "input": np.random.default_rng(0).normal(size=(2, 1, 5, 5)).astype(np.float32),
        "error": np.array("ValueError: bad — très"),
    }
    data = encode_frame(arrays)
    got = read_frame(stream_reader(io.BytesIO(data)))
    assert list(got) == list(arrays)
    for name, value in arrays.items():
        assert got[name].dtype == value.dtype
        np.testing.assert_array_equal(got[name], value)
    with pytest.raises(EOFError):  # a worker that dies mid-reply
        read_frame(stream_reader(io.BytesIO(data[:-3])))


def test_worker_refuses_bad_inputs_and_keeps_running(keras_package: Path) -> None:
    worker = KerasWorker(keras_package / "model.keras", threads=1)
    try:
        assert worker.inputs[0]["name"] == "input" and worker.inputs[0]["shape"][1:] == [1, 28, 28]
        pid = worker.pid
        with pytest.raises(KerasInputError, match="lacks inputs"):
            worker.predict({"input_ids": np.zeros((1, 4), np.int64), "other": np.zeros(1)})
        x = np.zeros((3, 1, 28, 28), np.float32)
        assert worker.predict({"input": x}).shape == (3, 10)
        assert worker.pid == pid and worker.restarts == 0  # the refusal cost no restart
    finally:
        worker.close()
    with pytest.raises(KerasWorkerError, match="closed"):
        worker.predict({"input": x})


def test_engine_runs_a_keras_only_package_in_a_worker(keras_package: Path) -> None:
    engine = InferenceEngine(keras_package, device="cpu")
    try:
        info = engine.get_model_info()
        assert info["framework"] == "tensorflow" and info["providers"] == ["tensorflow-worker"]
        x = np.random.default_rng(1).normal(size=(4, 1, 28, 28)).astype(np.float32)
        np.testing.assert_allclose(
            engine.predict_batch(x), keras_predict(keras_package / "model.keras", x), atol=1e-5
        )
        with pytest.raises(ShapeMismatchError):
            engine.predict_batch(np.zeros((1, 3, 28, 28), np.float32))
    finally:
        engine.close()
    with pytest.raises(ModelLoadError, match="cuda"):
        InferenceEngine(keras_package, device="cuda")


@pytest.mark.slow
def test_server_process_never_loads_tensorflow_and_restarts_its_worker(
    keras_package: Path,
) -> None:
    image = np.random.default_rng(2).integers(0, 256, (28, 28), dtype=np.uint8)
    want_class, want_prob = _expected_top1(keras_package, image)
    with ServerProcess(package=str(keras_package), env=SERVER_ENV) as server:
        body = _predict(server.url, _png(image))
        top = body["predictions"][0]
        assert top["class_index"] == want_class
        assert top["probability"] == pytest.approx(want_prob, abs=1e-5)
        models = httpx.get(f"{server.url}/models", timeout=10).json()
        assert "tensorflow" in str(models)

        workers, leaks = _tensorflow_processes(server.pid)
        assert leaks == [] and not _maps_tensorflow(server.pid)
        assert len(workers) == 1 and _maps_tensorflow(workers[0])  # the check does see TF

        os.kill(workers[0], signal.SIGKILL)
        # A new worker starts at once; requests meanwhile may time out (504) or be refused at
        # admission because the expected wait exceeds the deadline (503 overloaded, with
        # Retry-After); none may fail. The new worker has the server's own start budget.
        # (Once the slow batch of the restart made admission refuse every later request.)
        deadline = time.monotonic() + START_TIMEOUT_S + 30
        while True:
            files = {"file": ("x.png", _png(image), "image/png")}
            r = httpx.post(f"{server.url}/predict", files=files, timeout=60)
            if r.status_code == 200:
                break
            assert r.status_code == 504 or (
                r.status_code == 503 and r.json()["error"]["type"] == "overloaded"
            ), r.text
            assert time.monotonic() < deadline, (
                f"no new worker within {START_TIMEOUT_S + 30:g} s\n{server.log_tail(6000)}"
            )
            time.sleep(0.5)
        assert r.json()["predictions"][0] == top
        restarted, leaks = _tensorflow_processes(server.pid)
        assert len(restarted) == 1 and restarted != workers and leaks == []


@pytest.mark.slow
def test_worker_ends_when_its_version_retires(
    keras_package: Path, tmp_mlflow_uri: str, tmp_path: Path
) -> None:
    registry = ModelRegistry(tmp_mlflow_uri)
    v1 = registry.register_model(keras_package, load_package_metadata(keras_package))
    registry.promote("keras_served", v1)
    # Version 2: the same network as ONNX (tf2onnx), a version that serves on ONNX Runtime.
    exported = export_keras_package(keras_package, tmp_path / "model.onnx")
    onnx_package = save_model_package(
        tmp_path / "onnx-package", load_config(KERAS_CONFIG), _metadata("onnx"),
        onnx_path=exported.path,
    )  # fmt: skip
    v2 = registry.register_model(onnx_package, load_package_metadata(onnx_package))
    image = np.random.default_rng(3).integers(0, 256, (28, 28), dtype=np.uint8)
    env = {**SERVER_ENV, "DLPIPE_MODEL_CACHE": str(tmp_path / "cache")}
    with ServerProcess(model_name="keras_served", tracking_uri=tmp_mlflow_uri, env=env) as server:
        first = _predict(server.url, _png(image))
        assert first["model_version"] == v1
        [worker], _ = _tensorflow_processes(server.pid)

        registry.promote("keras_served", v2)
        deadline = time.monotonic() + 60
        while _predict(server.url, _png(image))["model_version"] != v2:
            assert time.monotonic() < deadline, "the server never switched to version 2"
            time.sleep(0.5)
        while Path(f"/proc/{worker}").exists():  # retired: drained, then its worker stopped
            assert time.monotonic() < deadline, "the retired version's worker kept running"
            time.sleep(0.2)
        assert _tensorflow_processes(server.pid) == ([], [])
        second = _predict(server.url, _png(image))
        assert second["predictions"][0]["class_index"] == first["predictions"][0]["class_index"]
        assert second["predictions"][0]["probability"] == pytest.approx(
            first["predictions"][0]["probability"], abs=1e-4
        )
