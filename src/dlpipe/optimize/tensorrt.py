"""TensorRT from an ONNX file, when a GPU and TensorRT are present: the registered variant
(through ONNX Runtime's TensorRT execution provider) and a bare engine file.

The variant (`dlpipe optimize --targets tensorrt`, see `dlpipe.tracking.tensorrt_ep` for the
package's files):

    if (reason := tensorrt_ep_unavailable_reason()): print(reason)   # one line, this machine
    settings = stage_tensorrt_package("model.fp32.onnx", pkg, {"input": (1, 28, 28)})
    built = build_engine_cache(pkg, settings)        # FP16 engine into pkg/trt_cache
    check_fp16_parity(built.session, "model.fp32.onnx", samples)

A bare engine (TensorRT's own Python API, not served):

    result = build_tensorrt_engine("model.onnx", "model.fp16.plan", precision="fp16")
    if result.skipped: print(result.reason)   # one line, never an exception

The bare engine's INT8 uses TensorRT's implicit quantization only when given an ONNX graph with
Q/DQ nodes (our static INT8 file), which carries its own calibrated scales; otherwise INT8 is
refused with a clear reason.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from dlpipe.optimize.onnx_export import ParityError, make_session
from dlpipe.tracking import tensorrt_ep
from dlpipe.tracking.tensorrt_ep import DEFAULT_MAX_BATCH, TRT_PROVIDER, TensorRTSettings

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


# ------------------------------------------------------------------ the registered variant

FP16_PARITY_ATOL = 5e-2
FP16_PARITY_RTOL = 2e-2
"""The TensorRT FP16 engine's logits must be within 5e-2 + 2e-2 * |FP32| of the FP32 graph's on
ONNX Runtime's CPU provider. FP16 keeps 11 significant bits (rounding error 4.9e-4 per
operation); summed over a network's layers that reaches about 1e-2 of a logit's size, and
TensorRT may accumulate in FP16. An engine beyond twice that computes something else (a wrong
fusion, an overflow to inf), which a small test split's accuracy gate alone might not catch.
Within it, whether the predicted classes survive is the accuracy gate's question."""


class TensorRTUnavailable(RuntimeError):
    """ONNX Runtime could not run the graph on its TensorRT provider (one-line message)."""


def tensorrt_ep_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot offer TensorRT here (one line), or None when it lists it."""
    if TRT_PROVIDER in tensorrt_ep.available_providers():
        return None
    return (
        "tensorrt skipped: ONNX Runtime offers no TensorrtExecutionProvider here "
        "(needs a CUDA GPU with onnxruntime-gpu and tensorrt-cu12)"
    )


def stage_tensorrt_package(
    source_onnx: str | Path,
    package_dir: str | Path,
    sample_shapes: Mapping[str, Sequence[int]],
    max_batch: int = DEFAULT_MAX_BATCH,
    fixed_batch: int | None = None,
    workspace_bytes: int | None = None,
) -> TensorRTSettings:
    """Put the FP32 graph (as `model.onnx`), `tensorrt.json` and an empty `trt_cache/` in
    `package_dir`: the engine is built where the registered package will keep it. ONNX
    Runtime names a cached engine by a hash of the model's file name (not its path), the graph
    and the versions, so the engine built here is found again wherever the package is
    downloaded, as long as the graph is opened with the same optimization level (both sides
    use ORT_ENABLE_ALL).

    Args:
        sample_shapes: each graph input's shape without the batch axis, as preprocessing makes
            it (in graph input order).
        fixed_batch: the graph's batch size when its batch axis is not dynamic.
    """
    from dlpipe.tracking.package import ONNX_FILE, copy_onnx

    out = Path(package_dir)
    out.mkdir(parents=True, exist_ok=True)
    copy_onnx(Path(source_onnx), out / ONNX_FILE)
    settings = TensorRTSettings.for_inputs(sample_shapes, max_batch, fixed_batch)
    if workspace_bytes is not None:
        settings.workspace_bytes = workspace_bytes
    settings.save(out)
    return settings


@dataclass
class EngineCache:
    """A session on TensorRT whose engine is in `<package_dir>/trt_cache`."""

    session: Any
    settings: TensorRTSettings
    providers: list[str]
    """The providers ONNX Runtime put the session on, TensorRT first."""
    build_s: float
    """Session creation plus the first run at each profile shape (the engine build)."""


_ORT_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}  # fmt: skip


def _built_with() -> dict[str, str]:
    import onnxruntime as ort

    out = {"onnxruntime": ort.__version__}
    try:
        import tensorrt as trt

        out["tensorrt"] = str(trt.__version__)
    except ImportError:  # the provider found its libraries without the Python package
        pass
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:  # pragma: no cover - torch is a dependency of optimize
        pass
    return out


def build_engine_cache(package_dir: str | Path, settings: TensorRTSettings) -> EngineCache:
    """Open the package's graph on TensorRT (FP16, its profile) and run it once at the min, opt
    and max shapes, so the engine and timing cache are written to `<package_dir>/trt_cache`.

    Raises:
        TensorRTUnavailable: ONNX Runtime did not put the session on TensorRT (its libraries
            are missing, no GPU is visible): the message names the providers it used.
    """
    import onnxruntime as ort

    from dlpipe.tracking.package import ONNX_FILE

    pkg = Path(package_dir)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    providers = tensorrt_ep.tensorrt_providers(pkg, settings)
    start = time.perf_counter()
    session = tensorrt_ep.create_session(pkg / ONNX_FILE, providers, options)
    in_effect = list(session.get_providers())
    if TRT_PROVIDER not in in_effect:
        raise TensorRTUnavailable(
            f"tensorrt skipped: ONNX Runtime did not start {TRT_PROVIDER} (the session runs on "
            f"{', '.join(in_effect)}); are TensorRT's libraries installed and a GPU visible?"
        )
    types = {i.name: _ORT_NUMPY.get(i.type, np.float32) for i in session.get_inputs()}
    for shapes in (settings.min_shapes, settings.opt_shapes, settings.max_shapes):
        session.run(None, {n: np.zeros(shape, types[n]) for n, shape in shapes.items()})
    build_s = time.perf_counter() - start
    settings.built_with = _built_with()
    settings.save(pkg)
    return EngineCache(session, settings, in_effect, build_s)


def _feeds(samples: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    if isinstance(samples, dict):
        return {n: np.asarray(samples[n]) for n in names}
    if len(names) != 1:
        raise ValueError(f"the graph takes inputs {list(names)}; got one array")
    return {names[0]: np.asarray(samples)}


def check_fp16_parity(
    session: Any,
    fp32_onnx: str | Path,
    samples: Any,
    max_batch: int = DEFAULT_MAX_BATCH,
    atol: float = FP16_PARITY_ATOL,
    rtol: float = FP16_PARITY_RTOL,
) -> float:
    """Largest |TensorRT - FP32 on CPU| over `samples` (an array, or a dict of arrays by input
    name), run in slices of `max_batch`.

    Raises:
        ParityError: some logit is beyond `atol + rtol * |FP32|`.
    """
    reference = make_session(fp32_onnx)
    names = [i.name for i in reference.get_inputs()]
    feeds = _feeds(samples, names)
    count = len(next(iter(feeds.values())))
    worst, excess = 0.0, 0.0
    for i in range(0, count, max_batch):
        part = {n: v[i : i + max_batch] for n, v in feeds.items()}
        expected = np.asarray(reference.run(None, part)[0], dtype=np.float32)
        got = np.asarray(session.run(None, part)[0], dtype=np.float32)
        if got.shape != expected.shape:
            raise ParityError(f"TensorRT output shape {got.shape} != FP32 {expected.shape}")
        diff = np.abs(got - expected)
        if not np.isfinite(got).all():
            excess = float("inf")
        worst = max(worst, float(diff.max(initial=0.0)))
        excess = max(excess, float((diff - (atol + rtol * np.abs(expected))).max(initial=0.0)))
    if excess > 0:
        raise ParityError(
            f"tensorrt fp16 parity: max |TensorRT - FP32| {worst:.3g} on the first {count} test "
            f"samples, beyond {atol:g} + {rtol:g}*|FP32|"
        )
    return worst
