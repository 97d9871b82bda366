"""GPU utilization and memory gauges, read through NVML (`nvidia-ml-py`) on a background thread.

    monitor = GpuMonitor(collector, interval_s=5)   # NVML when a GPU exists, else a no-op
    monitor.start(); ...; monitor.stop()

Tests inject a `reader` (any callable returning `GpuReading`s) to feed fake readings.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dlpipe.monitoring.metrics import MetricsCollector

logger = logging.getLogger("dlpipe.monitoring.gpu")


@dataclass(frozen=True)
class GpuReading:
    """One GPU's state at one moment."""

    gpu: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int


GpuReader = Callable[[], Sequence[GpuReading]]


class NvmlReader:
    """Reads every visible GPU through NVML. Raises `RuntimeError` when NVML cannot start."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # NVMLError, missing library or driver
            raise RuntimeError(f"NVML unavailable: {exc}") from exc
        self._nvml: Any = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(self._count)]

    @property
    def device_count(self) -> int:
        return self._count

    def __call__(self) -> list[GpuReading]:
        readings = []
        for index, handle in enumerate(self._handles):
            util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            readings.append(GpuReading(str(index), float(util.gpu), int(mem.used), int(mem.total)))
        return readings

    def close(self) -> None:
        self._nvml.nvmlShutdown()


class GpuMonitor:
    """Polls GPU readings every `interval_s` seconds into a `MetricsCollector`.

    Args:
        collector: where the gauges `dlpipe_gpu_*` live.
        reader: callable returning readings; NVML when None. Without NVML or without any GPU
            the monitor logs one line and does nothing.
        interval_s: seconds between polls.
    """

    def __init__(
        self,
        collector: MetricsCollector,
        reader: GpuReader | None = None,
        interval_s: float = 5.0,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s!r}")
        self.collector = collector
        self.interval_s = interval_s
        self._nvml: NvmlReader | None = None
        self._uses_nvml = reader is None
        if reader is None:
            reader = self._open_nvml()
        self.reader = reader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _open_nvml(self) -> GpuReader | None:
        try:
            nvml = NvmlReader()
        except RuntimeError as exc:
            logger.info("no GPU metrics: %s", exc)
            return None
        if nvml.device_count == 0:
            logger.info("no GPU metrics: NVML sees no GPU")
            nvml.close()
            return None
        self._nvml = nvml
        return nvml

    @property
    def enabled(self) -> bool:
        """Whether there is anything to read."""
        return self.reader is not None

    def poll_once(self) -> list[GpuReading]:
        """Read every GPU once and update the gauges; a failed read is logged, not raised."""
        if self.reader is None:
            return []
        try:
            readings = list(self.reader())
        except Exception:
            logger.exception("reading GPU metrics failed")
            return []
        for r in readings:
            self.collector.record_gpu_utilization(r.utilization_percent, gpu=r.gpu)
            self.collector.record_gpu_memory(r.memory_used_bytes, r.memory_total_bytes, gpu=r.gpu)
        return readings

    def start(self) -> None:
        """Start polling on a daemon thread (no-op when disabled or already running)."""
        if self._thread is not None and self._thread.is_alive():
            return
        if self.reader is None and self._uses_nvml:
            self.reader = self._open_nvml()  # reopened after a stop()
        if self.reader is None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="dlpipe-gpu-monitor", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop polling and release NVML (`start()` opens it again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 1)
            self._thread = None
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
            self.reader = None

    def __enter__(self) -> GpuMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
