"""Test helpers: tiny exported model packages and encoded images (no network, no hubs)."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from dlpipe.config import PipelineConfig
from dlpipe.models import create_model
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.package import save_model_package

CLASS_NAMES = [f"class_{i}" for i in range(10)]


def export_onnx(net: torch.nn.Module, path: Path, shape: tuple[int, ...]) -> Path:
    """Export with a dynamic batch dimension (torch.export based exporter, weights inline)."""
    net.eval()
    dummy = torch.randn(2, *shape)
    program = torch.onnx.export(
        net,
        (dummy,),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        opset_version=18,
        dynamo=True,
        verbose=False,
    )
    assert program is not None
    program.save(str(path), external_data=False)
    return path


def make_package(
    root: Path,
    *,
    version: str = "1",
    seed: int = 0,
    onnx: bool = True,
    width: int = 8,
    model_name: str = "fashion",
) -> Path:
    """A simple_cnn package (28x28 grayscale, 10 classes); seed makes versions differ."""
    torch.manual_seed(seed)
    cfg = PipelineConfig.model_validate(
        {
            "model": {"name": "simple_cnn", "extra": {"width": width}},
            "preprocessing": {"class_names": CLASS_NAMES, "augment": False},
        }
    )
    net = create_model("simple_cnn", 10, 1, width=width).eval()
    meta = ModelMetadata(
        model_name=model_name,
        framework="onnx" if onnx else "pytorch",
        precision="fp32",
        model_size_mb=0.0,
        training_date=utc_now(),
        accuracy_metrics={"val/acc": 0.5},
        preprocessing_config=cfg.preprocessing,
        version=version,
    )
    out = root / f"pkg-v{version}-s{seed}"
    onnx_path = None
    if onnx:
        out.mkdir(parents=True, exist_ok=True)
        onnx_path = export_onnx(net, root / f"tmp-v{version}-s{seed}.onnx", (1, 28, 28))
    return save_model_package(out, cfg, meta, net=net, onnx_path=onnx_path)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def random_png(rng: np.random.Generator, size: int = 28) -> bytes:
    return png_bytes(rng.integers(0, 256, (size, size), dtype=np.uint8))


def biased_copy(onnx_path: Path, out_path: Path, winner: int, margin: float = 1000.0) -> Path:
    """A copy of a classifier graph whose final bias makes class `winner` always win.

    Versions built this way answer differently, so a test sees which version computed a
    response from the prediction itself, not only from the `model_version` field.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    biases = [
        init
        for init in model.graph.initializer
        if init.name.endswith("bias") and list(init.dims) == [len(CLASS_NAMES)]
    ]
    if not biases:
        raise ValueError(f"{onnx_path}: no {len(CLASS_NAMES)}-class bias initializer found")
    last = biases[-1]
    values = numpy_helper.to_array(last).copy()
    values[:] = 0.0
    values[winner] = margin
    last.CopyFrom(numpy_helper.from_array(values.astype(np.float32), last.name))
    onnx.save(model, str(out_path))
    return out_path


def make_biased_package(root: Path, base_onnx: Path, version: str, winner: int) -> Path:
    """An ONNX-only package (version `version`) that always predicts class `winner`."""
    cfg = PipelineConfig.model_validate(
        {
            "model": {"name": "simple_cnn", "extra": {"width": 8}},
            "preprocessing": {"class_names": CLASS_NAMES, "augment": False},
        }
    )
    meta = ModelMetadata(
        model_name="fashion",
        framework="onnx",
        precision="fp32",
        model_size_mb=0.0,
        training_date=utc_now(),
        accuracy_metrics={"val/acc": 0.5},
        preprocessing_config=cfg.preprocessing,
        version=version,
    )
    out = root / f"biased-v{version}"
    out.mkdir(parents=True, exist_ok=True)
    graph = biased_copy(base_onnx, root / f"biased-v{version}.onnx", winner)
    return save_model_package(out, cfg, meta, onnx_path=graph)


class FakeGpuReader:
    """Stands in for NVML: returns whatever readings the test put in."""

    def __init__(self) -> None:
        from dlpipe.monitoring.gpu import GpuReading

        self.readings: list[GpuReading] = []

    def __call__(self) -> list:  # type: ignore[type-arg]
        return list(self.readings)


def sample_value(app, name: str, labels: dict[str, str] | None = None) -> float:  # type: ignore[no-untyped-def]
    """Current value of one metric sample in the app's own registry (0 when absent)."""
    value = app.state.collector.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


def upload(data: bytes, field: str = "file", name: str = "x.png") -> dict:  # type: ignore[type-arg]
    return {field: (name, data, "image/png")}


@contextmanager
def ready_client(app: Any, timeout_s: float = 120.0, **kwargs: Any) -> Iterator[TestClient]:
    """A TestClient on `app` once a model version serves (the app starts without waiting)."""
    with TestClient(app, **kwargs) as client:
        deadline = time.monotonic() + timeout_s
        while not app.state.manager.ready:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no model ready: {app.state.manager.describe()}")
            time.sleep(0.02)
        yield client
