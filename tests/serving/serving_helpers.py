"""Test helpers: tiny exported model packages and encoded images (no network, no hubs)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
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
