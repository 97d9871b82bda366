"""A TensorRT variant's package files, and the ONNX Runtime providers they turn into.

    <package>/model.onnx     the parent's FP32 graph: TensorRT builds its FP16 engine from it
    <package>/tensorrt.json  the TensorRT execution provider's settings (`TensorRTSettings`)
    <package>/trt_cache/     engines, their profiles and the timing cache, filled by
                             `dlpipe optimize` on a GPU so that a server loads instead of builds

`dlpipe.optimize.tensorrt` writes these files and fills the cache; `dlpipe.serving.engine` opens
them. Both get their provider list from `tensorrt_providers`, ask which providers ONNX Runtime
offers through `available_providers` and create their sessions through `create_session`: one
place each. Serving imports this module, so it imports no torch, and onnxruntime only inside
the functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TENSORRT_FILE = "tensorrt.json"
ENGINE_CACHE_DIR = "trt_cache"
TRT_PROVIDER = "TensorrtExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"

Provider = str | tuple[str, dict[str, Any]]
"""An entry of ONNX Runtime's `providers=`: a name, or (name, provider options)."""

DEFAULT_MAX_BATCH = 32
"""The largest batch of the engine's profile: `dlpipe serve`'s default `max_batch_size`. A
server with larger batches runs them in slices of this size (never outside the profile)."""

DEFAULT_WORKSPACE_BYTES = 2 * 1024**3


@dataclass
class TensorRTSettings:
    """What `tensorrt.json` holds: precision, caches, workspace and the one dynamic profile.

    Shapes are full input shapes, batch first, per graph input name. Paths are not stored:
    the cache is `<package>/trt_cache` wherever the package has been downloaded to.
    """

    min_shapes: dict[str, list[int]]
    opt_shapes: dict[str, list[int]]
    max_shapes: dict[str, list[int]]
    fp16: bool = True
    engine_cache: bool = True
    timing_cache: bool = True
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES
    built_with: dict[str, str] = field(default_factory=dict)
    """Versions and GPU the cache was built with (engines are specific to all of them)."""

    @classmethod
    def for_inputs(
        cls,
        sample_shapes: Mapping[str, Sequence[int]],
        max_batch: int = DEFAULT_MAX_BATCH,
        fixed_batch: int | None = None,
    ) -> TensorRTSettings:
        """A profile of batch 1 (min), `max_batch // 2` (opt) and `max_batch` (max).

        Args:
            sample_shapes: each input's shape without the batch axis, as preprocessing makes
                it (a text model's sequence axis is padded to `max_sequence_length`).
            fixed_batch: the graph's batch size when it is not dynamic (all three use it).
        """
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        low, mid, high = (
            (fixed_batch,) * 3 if fixed_batch else (1, max(1, max_batch // 2), max_batch)
        )

        def at(batch: int) -> dict[str, list[int]]:
            return {name: [int(batch), *map(int, dims)] for name, dims in sample_shapes.items()}

        return cls(at(low), at(mid), at(high))

    @property
    def max_batch(self) -> int:
        """The largest batch the profile admits."""
        return min(shape[0] for shape in self.max_shapes.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TensorRTSettings:
        return cls(**json.loads(text))

    def save(self, package_dir: str | Path) -> Path:
        """Write `tensorrt.json` and create the (empty) engine cache directory."""
        out = Path(package_dir)
        (out / ENGINE_CACHE_DIR).mkdir(parents=True, exist_ok=True)
        (out / TENSORRT_FILE).write_text(self.to_json())
        return out / TENSORRT_FILE


def load_settings(package_dir: str | Path) -> TensorRTSettings | None:
    """The package's TensorRT settings, or None when it has no `tensorrt.json`."""
    path = Path(package_dir) / TENSORRT_FILE
    if not path.is_file():
        return None
    return TensorRTSettings.from_json(path.read_text())


def _shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """ONNX Runtime's profile syntax: `input_ids:1x128,attention_mask:1x128`."""
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def provider_options(package_dir: str | Path, settings: TensorRTSettings) -> dict[str, Any]:
    """TensorrtExecutionProvider's options for a package: its cache path made absolute where
    the package is now. Booleans are Python bools, as ONNX Runtime's Python API expects."""
    cache = str((Path(package_dir) / ENGINE_CACHE_DIR).resolve())
    return {
        "trt_fp16_enable": settings.fp16,
        "trt_max_workspace_size": int(settings.workspace_bytes),
        "trt_engine_cache_enable": settings.engine_cache,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": settings.timing_cache,
        "trt_timing_cache_path": cache,
        "trt_profile_min_shapes": _shapes(settings.min_shapes),
        "trt_profile_opt_shapes": _shapes(settings.opt_shapes),
        "trt_profile_max_shapes": _shapes(settings.max_shapes),
    }


def tensorrt_providers(package_dir: str | Path, settings: TensorRTSettings) -> list[Provider]:
    """TensorRT with the package's options, then CUDA (nodes TensorRT cannot take), then CPU."""
    return [(TRT_PROVIDER, provider_options(package_dir, settings)), CUDA_PROVIDER, CPU_PROVIDER]


def provider_names(providers: Sequence[Provider]) -> list[str]:
    """The names in a `providers=` list (options dropped)."""
    return [p if isinstance(p, str) else p[0] for p in providers]


def available_providers() -> list[str]:
    """The execution providers this ONNX Runtime build offers (the GPU build lists TensorRT even
    where its libraries are missing: whether a session really got it, `get_providers` says)."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def create_session(
    onnx_path: str | Path, providers: Sequence[Provider], sess_options: Any = None
) -> Any:
    """An `onnxruntime.InferenceSession` on `providers`, in that order of preference."""
    import onnxruntime as ort

    return ort.InferenceSession(str(onnx_path), sess_options=sess_options, providers=providers)
