"""TensorRT engines (FP16, INT8) from an ONNX file, when a GPU and TensorRT are present.

    result = build_tensorrt_engine("model.onnx", "model.fp16.plan", precision="fp16")
    if result.skipped: print(result.reason)   # one line, never an exception

The engine is built with TensorRT's own Python API (`tensorrt` package). INT8 uses TensorRT's
implicit quantization only when given an ONNX graph with Q/DQ nodes (our static INT8 file),
which carries its own calibrated scales; otherwise INT8 is refused with a clear reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

TrtPrecision = Literal["fp16", "int8"]


@dataclass
class TensorRTResult:
    """An engine file, or why none was built."""

    precision: str
    engine_path: Path | None = None
    reason: str = ""

    @property
    def skipped(self) -> bool:
        return self.engine_path is None


def tensorrt_unavailable_reason() -> str | None:
    """Why TensorRT cannot run here (one line), or None when it can."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "tensorrt skipped: no CUDA GPU available"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "tensorrt skipped: torch is not installed"
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt skipped: the tensorrt package is not installed (pip install tensorrt)"
    return None


def _has_qdq(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node)


def build_tensorrt_engine(
    onnx_path: str | Path,
    output_path: str | Path,
    precision: TrtPrecision = "fp16",
    max_batch: int = 32,
    workspace_gb: float = 2.0,
) -> TensorRTResult:
    """Build a serialized TensorRT engine with a dynamic batch profile (1..max_batch).

    Never raises for a missing GPU/TensorRT or an unbuildable graph: the result says why
    it was skipped, in one line, and the caller keeps the ONNX variants.
    """
    reason = tensorrt_unavailable_reason()
    if reason is not None:
        log.info(reason)
        return TensorRTResult(precision, None, reason)
    src, out = Path(onnx_path), Path(output_path)
    if precision == "int8" and not _has_qdq(src):
        return TensorRTResult(
            precision, None, "tensorrt int8 skipped: give the static INT8 (Q/DQ) ONNX file"
        )
    try:
        engine = _build(src, precision, max_batch, workspace_gb)
    except Exception as err:  # TensorRT parser/builder errors are reported, not raised
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return TensorRTResult(precision, None, f"tensorrt {precision} skipped: {first}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(engine)
    return TensorRTResult(precision, out, "")


def _build(src: Path, precision: str, max_batch: int, workspace_gb: float) -> bytes:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(src)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"ONNX parser: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 1024**3))
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(int(d) for d in tuple(tensor.shape)[1:])
        # Dynamic non-batch axes (text sequence length): 1..512, tuned for 64.
        low = tuple(d if d > 0 else 1 for d in dims)
        mid = tuple(d if d > 0 else 64 for d in dims)
        high = tuple(d if d > 0 else 512 for d in dims)
        profile.set_shape(
            tensor.name, (1, *low), (max(1, max_batch // 2), *mid), (max_batch, *high)
        )
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT builder returned no engine")
    return bytes(engine)
