"""`InferenceEngine`: one model version on ONNX Runtime, or PyTorch when the package has no ONNX,
or a TensorFlow worker process when it has only `model.keras`.

    engine = InferenceEngine("runs/model", device="cpu")
    logits = engine.predict_batch(np.zeros((8, 1, 28, 28), np.float32))
    engine.close()                       # ends a TensorFlow worker; nothing to do otherwise

`model_path` is a model package directory (see `dlpipe.tracking.package`) or a bare `.onnx` file.
A Keras model never runs in this process (`dlpipe.serving.keras_engine`).

ONNX graphs run on CUDA when ONNX Runtime offers it (`device` auto or cuda), else on CPU. Only a
TensorRT variant (metadata `framework: tensorrt`, see `dlpipe.tracking.tensorrt_ep`) runs on
TensorRT, with its package's options: FP16, its profile and the engine cache in its `trt_cache/`.
Where TensorRT is not offered (or `device='cpu'`), that package's FP32 graph runs on the providers
that are, with one warning; `framework`, `precision` and `providers` say what actually runs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.tracking import tensorrt_ep
from dlpipe.tracking.metadata import ModelMetadata
from dlpipe.tracking.package import KERAS_FILE, METADATA_FILE, ONNX_FILE, WEIGHTS_FILE
from dlpipe.tracking.tensorrt_ep import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    ENGINE_CACHE_DIR,
    TENSORRT_FILE,
    TRT_PROVIDER,
    Provider,
)

log = logging.getLogger(__name__)

Batch = np.ndarray | dict[str, np.ndarray]

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
}


class ShapeMismatchError(ValueError):
    """An input whose shape or dtype the model cannot take (served as HTTP 400)."""


_OOM_MARKERS = (
    "out of memory",
    "failed to allocate memory",
    "cudaerrormemoryallocation",
    "cublas_status_alloc_failed",
    "bad_alloc",
)


def is_out_of_memory(err: BaseException) -> bool:
    """A device (or host) allocation failure, as ONNX Runtime, CUDA or torch report it."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    text = str(err).lower()
    return any(marker in text for marker in _OOM_MARKERS)


GPU_MEMORY_FACTOR = 3.0
"""A model on the GPU needs about this many times its file size (weights, activations, the
execution provider's workspace) before its first batch."""


def check_gpu_headroom(model_bytes: int, readings: Any, headroom_mb: float) -> None:
    """Refuse a load that would leave less than `headroom_mb` of GPU 0's memory free.

    Raises:
        ModelLoadError: naming what the model needs and what is free.
    """
    if not readings:
        return
    gpu = readings[0]
    free = gpu.memory_total_bytes - gpu.memory_used_bytes
    need = model_bytes * GPU_MEMORY_FACTOR + headroom_mb * 1e6
    if free < need:
        raise ModelLoadError(
            f"would not fit on GPU {gpu.gpu}: needs about {need / 1e6:.0f} MB "
            f"({GPU_MEMORY_FACTOR:g} x the model plus {headroom_mb:g} MB headroom), "
            f"{free / 1e6:.0f} MB free"
        )


class ModelLoadError(RuntimeError):
    """The package could not be turned into a runnable model."""


def _providers_for(device: str) -> list[Provider]:
    """CUDA then CPU, or CPU alone. TensorRT is left to TensorRT variants: with no profile and
    no cache it would build engines at every start, and again whenever a batch grows."""
    available = tensorrt_ep.available_providers()
    wanted: list[Provider] = [CPU_PROVIDER]
    if device in ("auto", "cuda"):
        if device == "cuda" and CUDA_PROVIDER not in available:
            raise ModelLoadError(f"device='cuda' but ONNX Runtime only offers {available}")
        if CUDA_PROVIDER in available:
            wanted = [CUDA_PROVIDER, *wanted]
    return wanted


class InferenceEngine:
    """Run one model version; thread-safe for one caller at a time (the batcher's thread)."""

    def __init__(
        self,
        model_path: str | Path,
        device: str = "auto",
        *,
        intra_op_threads: int = 0,
        gpu_headroom_mb: float | None = None,
    ) -> None:
        """`gpu_headroom_mb`: refuse to load onto a GPU that would then have less free memory."""
        path = Path(model_path)
        self.gpu_headroom_mb = gpu_headroom_mb
        if not path.exists():
            raise ModelLoadError(f"model path not found: {path}")
        self.path = path
        self.device = device
        self.metadata: ModelMetadata | None = None
        root = path if path.is_dir() else path.parent
        if (root / METADATA_FILE).is_file():
            self.metadata = ModelMetadata.from_json((root / METADATA_FILE).read_text())
        self.precision: str = self.metadata.precision if self.metadata else "fp32"
        self._batch_limit: int | None = None  # a TensorRT profile's largest batch
        onnx_file = path if path.is_file() else path / ONNX_FILE
        self._session: Any = None
        self._torch_net: Any = None
        self._keras: Any = None
        if onnx_file.suffix == ".onnx" and onnx_file.is_file():
            self._load_onnx(onnx_file, intra_op_threads)
        elif path.is_dir() and (path / WEIGHTS_FILE).is_file():
            self._load_torch(path)
        elif path.is_dir() and (path / KERAS_FILE).is_file():
            self._load_keras(path / KERAS_FILE, intra_op_threads)
        else:
            raise ModelLoadError(
                f"{path}: none of {ONNX_FILE}, {WEIGHTS_FILE} or {KERAS_FILE} found"
            )

    # ----------------------------------------------------------------- loading
    def _load_onnx(self, onnx_file: Path, intra_op_threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        # Spinning threads would steal the CPU the event loop needs between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = _providers_for(self.device)
        tensorrt = self.metadata is not None and self.metadata.framework == "tensorrt"
        if tensorrt:
            providers = self._tensorrt_providers(onnx_file.parent, providers)
        if self.gpu_headroom_mb is not None and providers[0] != CPU_PROVIDER:
            self._check_gpu_memory(onnx_file)
        try:
            self._session = tensorrt_ep.create_session(onnx_file, providers, opts)
        except Exception as err:  # ORT raises several unrelated types for a bad graph
            raise ModelLoadError(f"{onnx_file}: ONNX Runtime could not load it: {err}") from err
        self.framework = "onnx"
        self.providers: list[str] = list(self._session.get_providers())
        if tensorrt:
            self._settle_tensorrt(providers)
        self.inputs = [
            {"name": i.name, "shape": list(i.shape), "dtype": _ORT_DTYPES.get(i.type, np.float32)}
            for i in self._session.get_inputs()
        ]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def _tensorrt_providers(self, package: Path, plain: list[Provider]) -> list[Provider]:
        """TensorRT with the package's options before `plain`, where ONNX Runtime offers it."""
        settings = tensorrt_ep.load_settings(package)
        if settings is None:
            raise ModelLoadError(f"{package}: a tensorrt version without {TENSORRT_FILE}")
        if self.device == "cpu" or TRT_PROVIDER not in tensorrt_ep.available_providers():
            return plain
        try:  # the cache travels with the package; ORT writes into it when it must rebuild
            (package / ENGINE_CACHE_DIR).mkdir(exist_ok=True)
        except OSError as err:
            log.warning("%s: cannot create the engine cache directory: %s", package, err)
        self._batch_limit = settings.max_batch
        trt, *_ = tensorrt_ep.tensorrt_providers(package, settings)
        return [trt, *plain]

    def _settle_tensorrt(self, asked: list[Provider]) -> None:
        """Report what a TensorRT variant really runs on; warn (once, at load) when not TensorRT."""
        if TRT_PROVIDER in self.providers:
            self.framework = "tensorrt"
            return
        self._batch_limit = None
        self.precision = "fp32"  # the package's FP32 graph, not the FP16 engine
        if TRT_PROVIDER in tensorrt_ep.provider_names(asked):
            why = f"ONNX Runtime did not start {TRT_PROVIDER}"
        elif self.device == "cpu":
            why = "device='cpu'"
        else:
            why = f"ONNX Runtime offers no {TRT_PROVIDER}"
        log.warning(
            "%s is a TensorRT variant but %s: serving its FP32 graph on %s",
            self.path,
            why,
            ", ".join(self.providers),
        )

    def _check_gpu_memory(self, onnx_file: Path) -> None:
        from dlpipe.monitoring.gpu import NvmlReader

        try:
            reader = NvmlReader()
        except RuntimeError as err:  # no NVML: nothing to check against
            log.warning("GPU memory not checked before loading %s: %s", onnx_file, err)
            return
        try:
            size = onnx_file.stat().st_size
            data = onnx_file.with_name(onnx_file.name + ".data")
            size += data.stat().st_size if data.exists() else 0
            check_gpu_headroom(size, reader(), self.gpu_headroom_mb or 0.0)
        finally:
            reader.close()

    def _load_torch(self, package_dir: Path) -> None:
        import torch

        from dlpipe.models import input_names
        from dlpipe.tracking.package import load_package_config, load_torch_model

        try:
            net = load_torch_model(package_dir)
            cfg = load_package_config(package_dir)
        except Exception as err:
            raise ModelLoadError(f"{package_dir}: PyTorch fallback failed: {err}") from err
        use_cuda = self.device in ("auto", "cuda") and torch.cuda.is_available()
        if self.device == "cuda" and not use_cuda:
            raise ModelLoadError("device='cuda' but torch sees no CUDA device")
        self._torch_device = torch.device("cuda" if use_cuda else "cpu")
        self._torch_net = net.to(self._torch_device)
        self.framework = "pytorch"
        self.providers = [f"torch:{self._torch_device}"]
        pre = cfg.preprocessing
        if pre.task_type == "text_classification":
            length = pre.max_sequence_length
            self.inputs = [
                {"name": n, "shape": ["batch", length], "dtype": np.int64}
                for n in input_names(cfg.model.name)
            ]
        else:
            h, w = pre.image_size or (None, None)
            shape = ["batch", cfg.model.in_channels, h, w]
            self.inputs = [{"name": "input", "shape": shape, "dtype": np.float32}]
        self.output_names = ["logits"]

    def _load_keras(self, keras_file: Path, intra_op_threads: int) -> None:
        from dlpipe.serving.keras_engine import KerasWorker, KerasWorkerError

        if self.device == "cuda":
            # The worker's TensorFlow picks its devices itself; nothing here can promise CUDA.
            raise ModelLoadError("device='cuda' is not offered for Keras models; use auto or cpu")
        try:
            self._keras = KerasWorker(
                keras_file, threads=intra_op_threads, use_gpu=self.device != "cpu"
            )
        except KerasWorkerError as err:
            raise ModelLoadError(f"{keras_file}: {err}") from err
        self.framework = "tensorflow"
        self.providers = ["tensorflow-worker"]
        self.inputs = self._keras.inputs
        self.output_names = ["logits"]

    def close(self) -> None:
        """Release what the engine holds outside this process (a TensorFlow worker)."""
        if self._keras is not None:
            self._keras.close()

    # --------------------------------------------------------------- inference
    def _as_feed(self, batch: Batch) -> dict[str, np.ndarray]:
        if isinstance(batch, np.ndarray):
            if len(self.inputs) != 1:
                names = [i["name"] for i in self.inputs]
                raise ShapeMismatchError(f"model takes {len(names)} inputs {names}; got one array")
            batch = {self.inputs[0]["name"]: batch}
        feed = {}
        for spec in self.inputs:
            name = spec["name"]
            if name not in batch:
                raise ShapeMismatchError(f"missing input {name!r}; model takes {self.input_names}")
            arr = np.asarray(batch[name])
            self.check_shape(name, arr.shape, spec["shape"])
            feed[name] = np.ascontiguousarray(arr, dtype=spec["dtype"])
        return feed

    @staticmethod
    def check_shape(name: str, got: tuple[int, ...], expected: list[Any]) -> None:
        """Raise `ShapeMismatchError` unless `got` fits `expected` (dynamic axes match anything)."""
        if len(got) != len(expected):
            raise ShapeMismatchError(
                f"input {name!r} has {len(got)} dimensions {list(got)}; "
                f"the model expects {len(expected)} {expected}"
            )
        for axis, (g, e) in enumerate(zip(got, expected, strict=True)):
            if axis > 0 and isinstance(e, int) and e > 0 and g != e:
                raise ShapeMismatchError(
                    f"input {name!r} has shape {list(got)}; the model expects {expected} "
                    f"(dimension {axis} must be {e})"
                )

    def predict_batch(self, input_batch: Batch) -> np.ndarray:
        """Logits `[N, K]` for a batch (an array, or a dict of arrays for text models)."""
        feed = self._as_feed(input_batch)
        if self._keras is not None:
            return self._predict_keras(feed)
        if self._session is None:
            return self._predict_torch(feed)
        fixed = self.inputs[0]["shape"][0]
        n = next(iter(feed.values())).shape[0]
        if isinstance(fixed, int) and fixed > 0 and n != fixed:
            # A graph exported with a fixed batch size: run it one slice at a time.
            return self._run_slices(feed, n, fixed)
        if self._batch_limit is not None and n > self._batch_limit:
            # Beyond the TensorRT profile: slices keep the cached engine (no rebuild).
            return self._run_slices(feed, n, self._batch_limit)
        out: np.ndarray = self._session.run(self.output_names[:1], feed)[0]
        return out

    def _run_slices(self, feed: dict[str, np.ndarray], n: int, step: int) -> np.ndarray:
        head = self.output_names[:1]
        parts = [
            self._session.run(head, {k: v[i : i + step] for k, v in feed.items()})[0]
            for i in range(0, n, step)
        ]
        return np.concatenate(parts)

    def _predict_torch(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        tensors = [torch.from_numpy(feed[s["name"]]).to(self._torch_device) for s in self.inputs]
        with torch.inference_mode():
            out = self._torch_net(*tensors)
        return np.asarray(out.float().cpu().numpy())

    def _predict_keras(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        from dlpipe.serving.keras_engine import KerasInputError

        try:
            logits: np.ndarray = self._keras.predict(feed)
        except KerasInputError as err:  # the model refused the input: the client's error (400)
            raise ShapeMismatchError(str(err)) from err
        return logits

    def predict(self, input_data: Batch) -> np.ndarray:
        """Logits `[K]` for one sample (no batch dimension)."""
        if isinstance(input_data, dict):
            batched: Batch = {k: np.asarray(v)[None] for k, v in input_data.items()}
        else:
            batched = np.asarray(input_data)[None]
        return self.predict_batch(batched)[0]

    def warmup(self, batch_sizes: tuple[int, ...] = (1,)) -> None:
        """Run dummy batches so the first real request does not pay allocation costs."""
        for n in batch_sizes:
            dummy = {}
            for spec in self.inputs:
                dims = [n] + [d if isinstance(d, int) and d > 0 else 1 for d in spec["shape"][1:]]
                dummy[spec["name"]] = np.zeros(dims, dtype=spec["dtype"])
            self.predict_batch(dummy)

    # -------------------------------------------------------------------- info
    @property
    def input_names(self) -> list[str]:
        return [s["name"] for s in self.inputs]

    def get_model_info(self) -> dict[str, Any]:
        """What this engine runs: metadata, framework, providers and tensor signatures."""
        meta = self.metadata
        return {
            "model_name": meta.model_name if meta else self.path.stem,
            "version": (meta.version if meta else "") or "1",
            "framework": self.framework,
            "precision": self.precision,
            "model_size_mb": meta.model_size_mb if meta else None,
            "providers": self.providers,
            "path": str(self.path),
            "inputs": [
                {"name": s["name"], "shape": s["shape"], "dtype": np.dtype(s["dtype"]).name}
                for s in self.inputs
            ],
            "outputs": self.output_names,
        }
