"""Property 17 on a real GPU: NVML gauges through the running app, and the CUDA fallback."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from serving_helpers import ready_client

from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.engine import InferenceEngine
from dlpipe.serving.sources import LocalSource
from dlpipe.tracking.package import ONNX_FILE

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_nvml_gauges_are_exposed_by_the_app(cnn_package: Path) -> None:
    cfg = ServeSettings(model_name="fashion", gpu_poll_interval_s=0.2, registry_refresh_s=3600)
    app = create_app(cfg, source=LocalSource.from_path("fashion", cnn_package))
    with ready_client(app) as client:
        assert app.state.gpu_monitor.enabled, "NVML should be readable on a GPU host"
        app.state.gpu_monitor.poll_once()
        text = client.get("/metrics").text
    samples = {
        (s.name, s.labels.get("gpu")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name.startswith("dlpipe_gpu_")
    }
    total = samples[("dlpipe_gpu_memory_total_bytes", "0")]
    assert total > 1e9
    assert 0 <= samples[("dlpipe_gpu_memory_used_bytes", "0")] <= total
    assert 0 <= samples[("dlpipe_gpu_utilization_percent", "0")] <= 100


def test_pytorch_fallback_runs_on_cuda(cnn_package: Path, tmp_path: Path) -> None:
    torch_only = tmp_path / "torch_only"
    shutil.copytree(cnn_package, torch_only)
    (torch_only / ONNX_FILE).unlink()
    gpu = InferenceEngine(torch_only, "cuda")
    cpu = InferenceEngine(cnn_package, "cpu")
    assert gpu.get_model_info()["providers"] == ["torch:cuda"]
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(gpu.predict_batch(x), cpu.predict_batch(x), rtol=1e-3, atol=1e-3)
