"""One served model version: its engine, its preprocessing and its own micro-batcher.

Closing the batcher (what the manager does when it retires a version or stops) also closes the
engine, once the queued requests have run: a TensorFlow worker process ends with its version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import numpy as np

from dlpipe.config import PreprocessingConfig
from dlpipe.monitoring import MetricsCollector
from dlpipe.serving.admission import Arrivals
from dlpipe.serving.batcher import BatchStats, MicroBatcher
from dlpipe.serving.engine import InferenceEngine, ModelLoadError
from dlpipe.serving.inputs import InputDecoder, Sample, softmax_top_k
from dlpipe.serving.settings import ServeSettings
from dlpipe.tracking.package import PREPROCESSING_FILE, TOKENIZER_FILE

log = logging.getLogger(__name__)


def _read_preprocessing(path: Path, engine: InferenceEngine) -> PreprocessingConfig:
    root = path if path.is_dir() else path.parent
    if (root / PREPROCESSING_FILE).is_file():
        return PreprocessingConfig.model_validate_json((root / PREPROCESSING_FILE).read_text())
    if engine.metadata is not None:
        return engine.metadata.preprocessing_config
    raise ModelLoadError(f"{path}: no {PREPROCESSING_FILE} and no metadata to preprocess with")


class VersionBatcher(MicroBatcher[Sample, np.ndarray]):
    """A version's micro-batcher; `close()` drains it, then closes the version's engine."""

    engine: InferenceEngine | None = None

    async def close(self) -> None:
        await super().close()
        engine, self.engine = self.engine, None
        if engine is not None:
            await asyncio.to_thread(engine.close)  # waits for a worker process to exit


def sample_signature(sample: Sample) -> Hashable:
    """Shapes and dtypes of a sample: only samples with equal signatures can be stacked."""
    if isinstance(sample, dict):
        return tuple((k, v.shape, v.dtype.str) for k, v in sorted(sample.items()))
    return (sample.shape, sample.dtype.str)


class ServedModel:
    """A loaded, warmed-up version ready for `await infer(sample)`."""

    package_dir: Path | None = None
    """The package it was loaded from (quality reads its drift profile there)."""

    def __init__(
        self,
        model_name: str,
        version: str,
        engine: InferenceEngine,
        preprocessing: PreprocessingConfig,
        settings: ServeSettings,
        collector: MetricsCollector,
        arrivals: Arrivals | None = None,
        tokenizer_file: Path | None = None,
    ) -> None:
        self.model_name = model_name
        self.version = version
        self.engine = engine
        self.preprocessing = preprocessing
        self.decoder = InputDecoder(
            preprocessing, resize_inputs=settings.resize_inputs, tokenizer_file=tokenizer_file
        )
        self.collector = collector
        self.timeout_s = settings.request_timeout_ms / 1000.0
        self.batcher: MicroBatcher[Sample, np.ndarray] = VersionBatcher(
            self._run_batch,
            max_batch_size=settings.max_batch_size,
            max_wait_s=settings.max_wait_ms / 1000.0,
            capacity=settings.queue_capacity,
            name=f"{model_name}:{version}",
            on_batch=self._record_batch,
            arrivals=arrivals,
            signature=sample_signature,
        )
        self.batcher.engine = engine
        info = engine.get_model_info()
        self.framework = str(info["framework"])
        self.precision = str(info["precision"])
        self.loaded_at = time.time()

    @classmethod
    def load(
        cls,
        model_name: str,
        version: str,
        path: str | Path,
        settings: ServeSettings,
        collector: MetricsCollector,
        arrivals: Arrivals | None = None,
    ) -> ServedModel:
        """Build the engine and warm it up (blocking; run it off the event loop)."""
        path = Path(path)
        engine = InferenceEngine(
            path,
            settings.device,
            intra_op_threads=settings.ort_intra_op_threads,
            gpu_headroom_mb=settings.gpu_memory_headroom_mb,
        )
        try:
            preprocessing = _read_preprocessing(path, engine)
            tokenizer = (path if path.is_dir() else path.parent) / TOKENIZER_FILE
            served = cls(
                model_name,
                version,
                engine,
                preprocessing,
                settings,
                collector,
                arrivals,
                tokenizer_file=tokenizer if tokenizer.is_file() else None,
            )
            served.package_dir = path if path.is_dir() else path.parent
            if settings.warmup:
                sizes = sorted({1, min(8, settings.max_batch_size), settings.max_batch_size})
                engine.warmup(tuple(sizes))
                served.warm_decoder()
        except BaseException:
            engine.close()  # a version that never serves must not leave a worker behind
            raise
        return served

    def warm_decoder(self) -> None:
        """Push one synthetic input through decoding so lazy imports happen before /ready."""
        if self.preprocessing.task_type == "text_classification":
            self.decoder.text("warm up")
            return
        import io

        from PIL import Image

        h, w = self.preprocessing.image_size or (28, 28)
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.new("RGB", (w, h)).save(buf, format=fmt)
            self.decoder.image(buf.getvalue(), "warmup")

    # ---------------------------------------------------------------- batching
    def _run_batch(self, samples: list[Sample]) -> list[np.ndarray]:
        first = samples[0]
        batch: np.ndarray | dict[str, np.ndarray]
        if isinstance(first, dict):
            batch = {k: np.stack([s[k] for s in samples]) for k in first}  # type: ignore[index]
        else:
            batch = np.stack(samples)  # type: ignore[arg-type]
        logits = self.engine.predict_batch(batch)
        return list(logits)

    def _record_batch(self, stats: BatchStats) -> None:
        waits = stats.queue_waits_s
        self.collector.record_batch(stats.size, waits[0], stats.inference_s, self.version)
        for wait in waits[1:]:  # one queue-wait observation per request, not per batch
            self.collector.queue_wait.labels(self.version).observe(wait)
        # Expired requests are not counted here: each gets its 504, and its one `timeout`
        # count, from the error handler that answers it.

    async def infer(self, sample: Sample, timeout_s: float | None = None) -> np.ndarray:
        """Logits for one sample, batched with whatever else is in flight."""
        return await self.batcher.submit(sample, self.timeout_s if timeout_s is None else timeout_s)

    def top_k(self, logits: np.ndarray, k: int) -> list[dict[str, Any]]:
        return softmax_top_k(logits, self.preprocessing.class_names, k)

    def describe(self) -> dict[str, Any]:
        """What /models shows for this version."""
        info = self.engine.get_model_info()
        return {
            "version": self.version,
            "framework": self.framework,
            "precision": self.precision,
            "providers": info["providers"],
            "inputs": info["inputs"],
            "task": self.preprocessing.task_type,
            "class_names": self.preprocessing.class_names,
            "queue_depth": self.batcher.depth(),
            "batches_run": self.batcher.batches_run,
            "items_run": self.batcher.items_run,
        }
