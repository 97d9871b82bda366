"""POST /feedback and the prediction log through the real app (in-process, real ONNX Runtime):
the join, online accuracy per version and class, duplicates and unknown ids, sampling, v2
requests, failures recorded against their version, MLflow version tags."""

from __future__ import annotations

import json
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_helpers import CLASS_NAMES, make_biased_package, png_bytes, ready_client, upload

from dlpipe.quality import LiveStats, read_records
from dlpipe.serving.app import create_app
from dlpipe.serving.settings import ServeSettings
from dlpipe.serving.sources import LocalSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from deploy_helpers import failing_package

WINNER = 3  # the biased package always answers class_3


@pytest.fixture(scope="module")
def biased(tmp_path_factory: pytest.TempPathFactory, profiled_package: Path) -> Path:
    root = tmp_path_factory.mktemp("biased")
    return make_biased_package(root, profiled_package / "model.onnx", "1", WINNER)


def _app(package: Path, log_dir: Path, **settings: Any) -> Any:
    defaults = {"access_log": False, "warmup": False}
    s = ServeSettings(model_name="fashion", prediction_log_dir=str(log_dir), **defaults | settings)
    return create_app(s, source=LocalSource("fashion", {"1": package}))


def _value(app: Any, name: str, **labels: str) -> float | None:
    return app.state.collector.registry.get_sample_value(name, labels)


def _image(seed: int) -> bytes:
    return png_bytes(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


@pytest.fixture
def served(biased: Path, tmp_path: Path) -> Iterator[tuple[TestClient, Any, Path]]:
    app = _app(biased, tmp_path / "log", quality_window=10)
    with ready_client(app) as client:
        yield client, app, tmp_path / "log"


def _predict(client: TestClient, seed: int, rid: str | None = None) -> str:
    headers = {"X-Request-ID": rid} if rid else {}
    r = client.post("/predict", files=upload(_image(seed)), headers=headers)
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def test_feedback_joins_labels_to_predictions(served: tuple[TestClient, Any, Path]) -> None:
    client, app, log_dir = served
    ids = [_predict(client, i) for i in range(4)]
    items = [
        {"request_id": ids[0], "label": "class_3"},  # right, by name
        {"request_id": ids[1], "label": WINNER},  # right, by index
        {"request_id": ids[2], "label": "class_5"},  # wrong
        {"request_id": ids[3], "label": 5},  # wrong
        {"request_id": ids[0], "label": "class_3"},  # again: counted once
        {"request_id": "never-made", "label": 1},
        {"request_id": ids[3], "label": "no such class"},
    ]
    r = client.post("/feedback", json=items)
    assert r.status_code == 200, r.text
    body = r.json()
    outcomes = [x["outcome"] for x in body["results"]]
    assert outcomes == [
        "correct",
        "correct",
        "incorrect",
        "incorrect",
        "duplicate",
        "unknown",
        "duplicate",  # ids[3] was labeled by the item before
    ]
    assert body["joined"] == 4
    assert body["results"][2] == {
        "request_id": ids[2],
        "outcome": "incorrect",
        "model_version": "1",
        "predicted": "class_3",
    }
    fresh = _predict(client, 9)
    r = client.post("/feedback", json={"request_id": fresh, "label": "no such class"})
    assert r.json()["results"][0]["outcome"] == "invalid_label"
    r = client.post("/feedback", json={"request_id": fresh, "label": len(CLASS_NAMES)})
    assert r.json()["results"][0]["outcome"] == "invalid_label"

    app.state.quality.refresh()
    assert _value(app, "dlpipe_online_accuracy", model_version="1") == 0.5
    assert _value(app, "dlpipe_online_labeled", model_version="1") == 4
    # Per true class: both class_3 labels right, both class_5 labels wrong.
    assert (
        _value(app, "dlpipe_online_class_accuracy", model_version="1", **{"class": "class_3"})
        == 1.0
    )
    assert (
        _value(app, "dlpipe_online_class_accuracy", model_version="1", **{"class": "class_5"})
        == 0.0
    )
    # Its metadata has no test/acc: no reference to compare with (the alert needs one).
    assert _value(app, "dlpipe_reference_accuracy", model_version="1") is None
    for outcome, n in {"correct": 2, "incorrect": 2, "duplicate": 2, "invalid_label": 2}.items():
        assert _value(app, "dlpipe_feedback_total", model_version="1", outcome=outcome) == n
    assert _value(app, "dlpipe_feedback_total", model_version="", outcome="unknown") == 1

    # The labels are in the log too, so another process sees the same accuracy.
    app.state.quality.log.flush()
    stats = LiveStats.from_log(log_dir).stats("1")
    assert (stats.labeled, stats.correct, stats.requests) == (4, 2, 5)


def test_accuracy_window_slides(served: tuple[TestClient, Any, Path]) -> None:
    client, app, _ = served  # quality_window=10
    ids = [_predict(client, i) for i in range(15)]
    wrong = [{"request_id": i, "label": "class_0"} for i in ids[:5]]
    right = [{"request_id": i, "label": "class_3"} for i in ids[5:]]
    assert client.post("/feedback", json=wrong + right).json()["joined"] == 15
    app.state.quality.refresh()
    # The last 10 labels are all right: the 5 wrong ones left the window.
    assert _value(app, "dlpipe_online_accuracy", model_version="1") == 1.0
    assert _value(app, "dlpipe_online_labeled", model_version="1") == 10


def test_batch_and_v2_predictions_are_named_and_logged(
    served: tuple[TestClient, Any, Path],
) -> None:
    client, app, log_dir = served
    files = [("files", (f"{i}.png", _image(i), "image/png")) for i in range(3)]
    r = client.post("/predict/batch", files=files, headers={"X-Request-ID": "batch-1"})
    assert r.status_code == 200
    tensor = np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)
    v2 = {
        "inputs": [
            {
                "name": "input",
                "shape": [2, 1, 28, 28],
                "datatype": "FP32",
                "data": tensor.ravel().tolist(),
            }
        ]
    }
    r = client.post("/v2/models/fashion/infer", json=v2, headers={"X-Request-ID": "v2-1"})
    assert r.status_code == 200, r.text
    r = client.post(
        "/feedback",
        json=[{"request_id": f"batch-1/{i}", "label": 3} for i in range(3)]
        + [{"request_id": "v2-1/1", "label": 0}, {"request_id": "batch-1", "label": 3}],
    )
    assert [x["outcome"] for x in r.json()["results"]] == ["correct"] * 3 + ["incorrect", "unknown"]
    app.state.quality.log.flush()
    records = {r["request_id"]: r for r in read_records(log_dir) if r["type"] == "prediction"}
    assert set(records) == {"batch-1/0", "batch-1/1", "batch-1/2", "v2-1/0", "v2-1/1"}
    batch = records["batch-1/1"]
    assert batch["endpoint"] == "/predict/batch" and batch["route"] == "champion"
    assert batch["top_k"][0]["label"] == "class_3" and len(batch["top_k"]) == 5
    assert set(batch["input"]) == {"mean_intensity", "contrast", "pixels"}
    assert batch["input"]["pixels"] == 784
    v2_record = records["v2-1/0"]
    assert v2_record["endpoint"] == "/v2/models/{name}/infer"
    assert v2_record["input"]["mean_intensity"] == pytest.approx(float(tensor[0].mean()), abs=1e-4)


def test_sampling_keeps_exactly_the_ids_below_the_rate(biased: Path, tmp_path: Path) -> None:
    app = _app(biased, tmp_path / "log", prediction_log_sample=0.3)
    ids = [f"req-{i}" for i in range(200)]
    with ready_client(app) as client:
        for i, rid in enumerate(ids):
            _predict(client, i, rid)
        r = client.post("/feedback", json=[{"request_id": rid, "label": 3} for rid in ids])
    expected = {rid for rid in ids if zlib.crc32(rid.encode()) < int(0.3 * 2**32)}
    logged = {r["request_id"] for r in read_records(tmp_path / "log") if r["type"] == "prediction"}
    assert logged == expected and 30 < len(expected) < 90
    joined = {x["request_id"] for x in r.json()["results"] if x["outcome"] == "correct"}
    assert joined == expected  # an unsampled prediction is unknown to feedback


def test_failures_are_recorded_against_their_version(tmp_path: Path) -> None:
    """A version that fails at run time (bright images): its errors go to the log with their
    status, so a per-version error rate can be computed from the log alone."""
    (tmp_path / "pkg").mkdir()
    package = failing_package(tmp_path / "pkg")
    app = _app(package, tmp_path / "log")
    dark = png_bytes(np.zeros((28, 28), dtype=np.uint8))
    bright = png_bytes(np.full((28, 28), 255, dtype=np.uint8))
    with ready_client(app) as client:
        assert client.post("/predict", files=upload(dark)).status_code == 200
        for _ in range(3):
            assert client.post("/predict", files=upload(bright)).status_code == 500
        # Refused before routing (not an image): no version's error.
        assert client.post("/predict", files=upload(b"not an image")).status_code == 400
        app.state.quality.refresh()
        assert _value(app, "dlpipe_reference_accuracy", model_version="1") == 0.1
    stats = LiveStats.from_log(tmp_path / "log").stats("1")
    assert stats.requests == 4 and stats.status_counts == {200: 1, 500: 3}
    assert stats.error_rate == 0.75
    errors = [r for r in read_records(tmp_path / "log") if r["type"] == "error"]
    assert {e["error"] for e in errors} == {"inference_failed"} and len(errors) == 3


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"request_id": "x"},
        {"request_id": "", "label": 1},
        {"request_id": "x", "label": -1},
        {"request_id": "x", "label": 1, "extra": 2},
        [{"request_id": "x", "label": 1}] * 1001,
    ],
)
def test_malformed_feedback_is_a_400(served: tuple[TestClient, Any, Path], body: Any) -> None:
    client, _, _ = served
    r = client.post("/feedback", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_input"


def test_online_accuracy_becomes_mlflow_version_tags(
    tmp_mlflow_uri: str, biased: Path, tmp_path: Path
) -> None:
    from dlpipe.tracking.metadata import ModelMetadata
    from dlpipe.tracking.registry import ModelRegistry

    registry = ModelRegistry(tmp_mlflow_uri, cache_dir=tmp_path / "cache")
    meta = ModelMetadata.from_json((biased / "metadata.json").read_text())
    meta.version = ""
    assert registry.register_model(biased, meta) == "1"
    s = ServeSettings(
        model_name="fashion",
        tracking_uri=tmp_mlflow_uri,
        access_log=False,
        warmup=False,
        quality_tags_interval_s=0.2,
    )
    app = create_app(s)
    with ready_client(app) as client:
        ids = [_predict(client, i) for i in range(4)]
        labels = ["class_3", "class_3", "class_3", "class_1"]
        client.post(
            "/feedback",
            json=[{"request_id": i, "label": lab} for i, lab in zip(ids, labels, strict=True)],
        )
        deadline = time.monotonic() + 20
        tags: dict[str, str] = {}
        while time.monotonic() < deadline and "dlpipe.online_accuracy" not in tags:
            time.sleep(0.3)
            tags = registry.client.get_model_version("fashion", "1").tags
    assert tags["dlpipe.online_accuracy"] == "0.750000"
    assert tags["dlpipe.online_accuracy_labeled"] == "4"
    assert json.loads(tags["dlpipe.online_class_accuracy"]) == {"class_1": 0.0, "class_3": 1.0}
