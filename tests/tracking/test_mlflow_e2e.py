"""A version made by the real `train` + `optimize_version` is a real MLflow model and its runs
are what the MLflow UI expects: checked through other processes and MLflow's own API.

- a fresh Python process loads `models:/NAME@champion` (ONNX) and `models:/NAME/1` (PyTorch)
  with `mlflow.pyfunc.load_model` and answers the 100 test images as `dlpipe serve` does;
- a real `mlflow models serve --env-manager local` answers `/invocations`;
- the optimization variants are child runs of the training run with their metrics, the runs
  carry MLflow's context tags, and the three splits are the training run's dataset inputs.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient

import dlpipe
from dlpipe.config import load_config
from dlpipe.evaluation import ServerProcess, free_port, raw_test_samples
from dlpipe.routing import ABTestConfig
from dlpipe.tracking.registry import ModelRegistry

ROOT = Path(__file__).resolve().parents[2]
NAME = "fmnist_mlflow_e2e"
SAMPLES = 100
TARGETS = ["onnx", "int8"]


@pytest.fixture(scope="module")
def built(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Train (1 epoch, 2048 images), optimize to onnx + int8, champion = the onnx variant."""
    from dlpipe.optimize.variants import optimize_version
    from dlpipe.training import train

    root = tmp_path_factory.mktemp("e2e")
    old_cache = os.environ.get("DLPIPE_MODEL_CACHE")
    os.environ["DLPIPE_MODEL_CACHE"] = str(root / "cache")
    cfg = load_config(
        ROOT / "configs" / "fashion_mnist.yaml",
        [
            "data.limit_train_samples=2048",
            f"data.limit_eval_samples={SAMPLES}",
            "training.batch_size=64",
            "training.num_epochs=1",
            "training.progress_bar=false",
            f"training.checkpoint_dir={root / 'checkpoints'}",
            f"tracking.registered_model_name={NAME}",
            "optimize.calibration_samples=64",
        ],
    )
    started = time.perf_counter()
    result = train(cfg)
    registry = ModelRegistry(module_mlflow_uri)
    report = optimize_version(
        NAME, result.model_version, TARGETS, max_accuracy_drop=0.2, registry=registry
    )
    variants = {v.target: v for v in report.variants}
    assert all(v.status == "kept" for v in variants.values()), report.to_dict()
    champion = str(variants["onnx"].version)
    registry.promote(NAME, champion)
    # Version 1 (PyTorch weights) is served beside the champion, so requests can pin either.
    registry.set_ab_config(NAME, ABTestConfig(champion, str(result.model_version), 0.5))
    print(f"train + optimize: {time.perf_counter() - started:.1f} s")
    yield cfg, result, report, champion, module_mlflow_uri, root
    if old_cache is None:
        os.environ.pop("DLPIPE_MODEL_CACHE", None)
    else:
        os.environ["DLPIPE_MODEL_CACHE"] = old_cache


PYFUNC_SCRIPT = textwrap.dedent(
    """
    import json, pickle, sys
    import mlflow.pyfunc
    import pandas as pd

    pngs = pickle.load(open(sys.argv[1], "rb"))
    out = {}
    for key, uri in json.loads(sys.argv[2]).items():
        model = mlflow.pyfunc.load_model(uri)
        frame = model.predict(pd.DataFrame({"image": pngs}))
        out[key] = frame.to_dict(orient="list")
        out[key + "_torch_loaded"] = "torch" in sys.modules
    json.dump(out, open(sys.argv[3], "w"))
    """
)


def _wait_until_served(server: ServerProcess, versions: set[str], timeout_s: float = 120) -> None:
    """/ready means one version serves; the A/B partner may still be loading."""
    deadline = time.monotonic() + timeout_s
    while True:
        served = {m["version"] for m in httpx.get(server.url + "/models").json()["versions"]}
        if versions <= served:
            return
        assert time.monotonic() < deadline, f"only {served} of {versions} loaded"
        time.sleep(0.25)


def _server_predictions(server: ServerProcess, pngs: list[bytes], version: str) -> list[Any]:
    """Top-k answers of `dlpipe serve` pinned to `version`, one request per image (a 503 from
    a busy machine is retried after its Retry-After, as any client would)."""
    out = []
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        for png in pngs:
            for _ in range(50):
                r = client.post(
                    "/predict",
                    files={"file": ("x.png", png, "image/png")},
                    headers={"X-Model-Version": version},
                )
                if r.status_code != 503:
                    break
                time.sleep(min(1.0, float(r.headers.get("retry-after", "0.2"))))
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == version
            out.append(r.json()["predictions"])
    return out


@pytest.mark.slow
def test_pyfunc_in_a_fresh_process_answers_as_the_server_does(built: Any) -> None:
    cfg, result, _, champion, uri, root = built
    pngs = [png for png, _ in raw_test_samples(cfg, limit=SAMPLES)]
    assert len(pngs) == SAMPLES
    (root / "pngs.pkl").write_bytes(pickle.dumps(pngs))
    uris = {"champion": f"models:/{NAME}@champion", "torch": f"models:/{NAME}/1"}
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    env.pop("DLPIPE_MODEL_CACHE", None)  # MLflow downloads the version itself
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PYFUNC_SCRIPT, str(root / "pngs.pkl"), json.dumps(uris),
         str(root / "pyfunc.json")],
        env=env, cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    pyfunc = json.loads((root / "pyfunc.json").read_text())
    print(f"fresh process, 2 x load + {SAMPLES} predictions: {time.perf_counter() - started:.1f} s")
    assert pyfunc["champion_torch_loaded"] is False  # the ONNX version runs without torch

    server_env = {"OMP_NUM_THREADS": "1", "DLPIPE_MODEL_CACHE": str(root / "server-cache")}
    with ServerProcess(model_name=NAME, tracking_uri=uri, env=server_env) as server:
        _wait_until_served(server, {champion, str(result.model_version)})
        served = {
            "champion": _server_predictions(server, pngs, champion),
            "torch": _server_predictions(server, pngs, str(result.model_version)),
        }
    for key in ("champion", "torch"):
        ours = pyfunc[key]
        worst = 0.0
        for i, top_k in enumerate(served[key]):
            assert ours["label"][i] == top_k[0]["label"], (key, i)
            assert ours["class_index"][i] == top_k[0]["class_index"], (key, i)
            for entry in top_k:  # every class the server lists, not only the winner
                diff = abs(ours["probabilities"][i][entry["class_index"]] - entry["probability"])
                worst = max(worst, diff)
            assert ours["probability"][i] == pytest.approx(top_k[0]["probability"], abs=1e-5)
        assert worst <= 1e-5, (key, worst)
        print(f"{key}: {SAMPLES} labels equal, largest probability difference {worst:.2e}")
    labels = [label for _, label in raw_test_samples(cfg, limit=SAMPLES)]
    names = cfg.preprocessing.class_names or []
    hits = sum(names[y] == got for y, got in zip(labels, pyfunc["champion"]["label"], strict=True))
    # A trained model (chance is 10 %) answering with several classes, not a constant.
    assert hits > 0.3 * SAMPLES and len(set(pyfunc["champion"]["label"])) >= 3


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(built: Any) -> None:
    cfg, _, _, _, uri, root = built
    pngs = [png for png, _ in raw_test_samples(cfg, limit=3)]
    port = free_port()
    # As from an activated virtualenv: MLflow starts `uvicorn` from PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", "PATH": path}
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with open(root / "mlflow-serve.log", "w+b") as log:
        _serve_and_ask(cmd, env, root, port, pngs, cfg.preprocessing.class_names or [], log)


def _serve_and_ask(
    cmd: list[str], env: dict[str, str], root: Path, port: int, pngs: list[bytes],
    names: list[str], log: Any,
) -> None:  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (root / "mlflow-serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(png).decode()] for png in pngs],
            }
        }
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60.0)
        assert r.status_code == 200, r.text
        rows = r.json()["predictions"]
        assert len(rows) == len(pngs)
        for row in rows:
            assert row["label"] == names[row["class_index"]]
            assert row["probability"] == pytest.approx(max(row["probabilities"]))
            assert sum(row["probabilities"]) == pytest.approx(1.0)
        # A body that is no image is the client's fault: 400, not 500.
        bad = {"dataframe_split": {"columns": ["image"], "data": [["bm90IGFuIGltYWdl"]]}}
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json=bad, timeout=60.0)
        assert r.status_code == 400, r.text
        assert proc.poll() is None, "the server died answering a bad request"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and the uvicorn worker it started
        proc.wait(timeout=60)


def _is_ancestor_commit(commit: str) -> bool:
    """The commit exists in this checkout and HEAD descends from it (others commit meanwhile)."""
    check = subprocess.run(
        ["git", "-C", str(ROOT), "merge-base", "--is-ancestor", commit, "HEAD"],
        capture_output=True,
    )
    return check.returncode == 0


@pytest.mark.slow
def test_runs_carry_children_context_and_datasets(built: Any) -> None:
    _, result, report, _, uri, _ = built
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)

    # MLflow's context tags: a real user, a source, the checkout's commit.
    tags = run.data.tags
    assert tags["mlflow.user"] == getpass.getuser() != "unknown"
    assert run.info.user_id == tags["mlflow.user"]
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    if (ROOT / ".git").exists() and Path(dlpipe.__file__).resolve().is_relative_to(ROOT):
        # dlpipe runs from this checkout (pytest's script may live elsewhere): its commit.
        assert _is_ancestor_commit(tags["mlflow.source.git.commit"])

    # The three splits as dataset inputs, with digests and sizes.
    assert run.inputs is not None
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation", "test"}
    sizes = {"training": 2048, "validation": SAMPLES, "test": SAMPLES}
    for context, dataset in inputs.items():
        profile = json.loads(dataset.profile or "{}")
        assert profile["features_shape"] == [sizes[context], 28, 28, 1], context
        assert profile["targets_shape"] == [sizes[context]]
        assert dataset.source_type == "local" and len(dataset.digest) == 16
        assert json.loads(dataset.schema or "{}")["mlflow_tensorspec"]
    assert len({d.digest for d in inputs.values()}) == 3

    # Each variant is a child run of the training run with its metrics; kept ones registered.
    children = client.search_runs(
        [run.info.experiment_id], f"tags.mlflow.parentRunId = '{result.run_id}'"
    )
    by_name = {c.info.run_name: c for c in children}
    assert set(by_name) == set(TARGETS)
    for variant in report.variants:
        child = by_name[variant.target]
        assert child.info.run_id == variant.run_id and child.info.status == "FINISHED"
        metrics = child.data.metrics
        assert variant.latency is not None
        assert metrics["accuracy"] == pytest.approx(variant.accuracy)
        assert metrics["size_mb"] == pytest.approx(variant.size_mb)
        assert metrics["latency_p50_ms"] == pytest.approx(variant.latency.p50_ms)
        assert metrics["latency_p95_ms"] == pytest.approx(variant.latency.p95_ms)
        assert child.data.params["target"] == variant.target
        assert child.data.tags["dlpipe.status"] == "kept"
        assert child.data.tags["dlpipe.model_version"] == variant.version
        assert child.data.tags["mlflow.user"] == tags["mlflow.user"]
        assert client.get_model_version(NAME, str(variant.version)).run_id == child.info.run_id
    # No run of its own for the variants any more: no experiment named after the model.
    assert client.get_experiment_by_name(NAME) is None
