"""End to end: a registered Fashion-MNIST CNN -> `dlpipe optimize` -> gated, registered variants.

Real Fashion-MNIST (a small slice), a real MLflow sqlite registry, real ONNX Runtime sessions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from weight_precision import precision_violations

from dlpipe.optimize.cli import main

NAME = "fmnist_opt_test"


@pytest.fixture(scope="module")
def registered(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A briefly trained simple_cnn registered as version 1 of NAME."""
    from dlpipe.config import load_config
    from dlpipe.data import build_datamodule
    from dlpipe.models import create_model
    from dlpipe.tracking.metadata import ModelMetadata, utc_now
    from dlpipe.tracking.package import save_model_package
    from dlpipe.tracking.registry import ModelRegistry

    root = tmp_path_factory.mktemp("registered")
    old_cache = os.environ.get("DLPIPE_MODEL_CACHE")
    os.environ["DLPIPE_MODEL_CACHE"] = str(root / "cache")
    config = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist.yaml"
    cfg = load_config(
        config,
        [
            "data.limit_train_samples=2048",
            "data.limit_eval_samples=400",
            "training.batch_size=32",
            "optimize.calibration_samples=64",
            # A variant the gate must refuse: 90% of every layer's channels removed, no fine-tune.
            "optimize.prune_sparsity=0.9",
            "optimize.prune_method=structured",
        ],
    )
    datamodule = build_datamodule(cfg)
    torch.manual_seed(0)
    net = create_model("simple_cnn", 10, 1)  # the default model, ~200k weights
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(2):
        for x, y in datamodule.train_dataloader():
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            optimizer.step()
    net.eval()
    meta = ModelMetadata(
        model_name=NAME, framework="pytorch", precision="fp32", model_size_mb=0.0,
        training_date=utc_now(), accuracy_metrics={"test/acc": 0.0},
        preprocessing_config=cfg.preprocessing,
    )  # fmt: skip
    package = save_model_package(root / "pkg", cfg, meta, net=net)
    registry = ModelRegistry(module_mlflow_uri)
    version = registry.register_model(package, meta)
    yield registry, version, module_mlflow_uri
    if old_cache is None:
        os.environ.pop("DLPIPE_MODEL_CACHE", None)
    else:
        os.environ["DLPIPE_MODEL_CACHE"] = old_cache


@pytest.mark.slow
def test_optimize_cli_registers_kept_variants_and_refuses_degraded_ones(
    registered: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    registry, parent, uri = registered
    targets = "onnx,int8,fp16,pruned" + ("" if torch.cuda.is_available() else ",tensorrt")
    argv = [f"{NAME}:{parent}", "--targets", targets, "--max-accuracy-drop", "0.03"]
    code = main([*argv, "--tracking-uri", uri, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)  # stdout is the report alone; the table went to stderr
    assert "refused: dropped" in err  # the table says why the pruned variant is missing
    variants = {v["target"]: v for v in report["variants"]}
    assert report["parent_version"] == parent and report["test_samples"] == 400
    assert report["baseline_accuracy"] > 0.5  # a real, if briefly trained, model

    pruned = variants["pruned"]
    assert pruned["status"] == "refused" and pruned["version"] is None
    assert pruned["drop"] > 0.03 and "refused" in pruned["reason"]
    if "tensorrt" in variants:
        assert variants["tensorrt"]["status"] == "skipped"
        assert variants["tensorrt"]["reason"].startswith("tensorrt skipped:")

    kept = [variants[t] for t in ("onnx", "int8", "fp16")]
    assert all(v["status"] == "kept" and v["drop"] <= 0.03 for v in kept)
    versions = {v["version"] for v in kept}
    listed = {str(v["version"]) for v in registry.list_versions(NAME)}
    assert listed == {parent, *versions}  # refused variants were not registered

    fp32_size = variants["onnx"]["size_mb"]
    for v in kept:
        meta = registry.get_metadata(NAME, v["version"])
        assert meta.parent_version == parent and meta.framework == "onnx"
        assert meta.precision == v["precision"]
        assert meta.accuracy_metrics["test/acc"] == pytest.approx(v["accuracy"])
        assert meta.latency_ms is not None and meta.latency_ms > 0
        package = Path(registry.get_model(NAME, v["version"]))
        model_file = package / "model.onnx"
        assert meta.model_size_mb == pytest.approx(model_file.stat().st_size / 1e6, rel=1e-3)
        onnx.checker.check_model(str(model_file))
        if v["precision"] != "fp32":
            assert precision_violations(model_file, v["precision"]) == []
    assert variants["int8"]["size_mb"] <= 0.30 * fp32_size
    assert variants["fp16"]["size_mb"] <= 0.55 * fp32_size

    # Every variant, refused and skipped ones too, is a child run of the parent's run.
    client = registry.client
    parent_run = client.get_run(registry.get_metadata(NAME, parent).source_run_id)
    children = client.search_runs(
        [parent_run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_run.info.run_id}'"
    )
    runs = {c.info.run_name: c for c in children}
    assert set(runs) == set(variants)
    for target, v in variants.items():
        run = runs[target]
        assert run.info.run_id == v["run_id"] and run.info.status == "FINISHED"
        assert run.data.tags["dlpipe.status"] == v["status"]
        assert run.data.params["precision"] == v["precision"]
        assert run.data.params["parent_version"] == parent
        if v["status"] == "skipped":
            continue
        assert run.data.metrics["accuracy"] == pytest.approx(v["accuracy"])
        assert run.data.metrics["accuracy_drop"] == pytest.approx(v["drop"])
        assert run.data.metrics["size_mb"] == pytest.approx(v["size_mb"])
        assert run.data.metrics["latency_p95_ms"] == pytest.approx(v["latency"]["p95_ms"])
        assert run.data.metrics["parent_accuracy"] == pytest.approx(report["baseline_accuracy"])
    assert "dlpipe.model_version" not in runs["pruned"].data.tags
    assert runs["pruned"].data.tags["dlpipe.reason"] == pruned["reason"]
    for v in kept:
        assert runs[v["target"]].data.tags["dlpipe.model_version"] == v["version"]
        assert client.get_model_version(NAME, v["version"]).run_id == v["run_id"]
