"""Latency (p50/p95 at batch 1) and throughput (batch 32) of PyTorch modules and ORT sessions.

Timings interleave nothing and pin nothing: run them on a quiet machine, and compare variants
measured in the same process. `intra_op_num_threads` defaults to the number of cores torch uses.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dlpipe.optimize.onnx_export import make_session


@dataclass
class LatencyStats:
    """Milliseconds per call at batch 1, and samples per second at the throughput batch size."""

    p50_ms: float
    p95_ms: float
    throughput_per_s: float | None = None
    batch_size: int | None = None
    min_ms: float | None = None
    """Fastest call: on a shared machine, the closest figure to an idle one."""

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _timings(fn: Callable[[], Any], iterations: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    times = np.empty(iterations)
    for i in range(iterations):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return times


def _runner(
    model: nn.Module | str | Path | Any, inputs: Sequence[torch.Tensor]
) -> Callable[[], Any]:
    if isinstance(model, nn.Module):
        model.eval()

        def run_torch() -> Any:
            with torch.inference_mode():
                return model(*inputs)

        return run_torch
    session = (
        make_session(model, threads=torch.get_num_threads())
        if isinstance(model, str | Path)
        else model
    )
    names = [i.name for i in session.get_inputs()]
    feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs, strict=True)}
    return lambda: session.run(None, feeds)


def measure_latency(
    model: nn.Module | str | Path | Any,
    make_inputs: Callable[[int], Sequence[torch.Tensor]],
    iterations: int = 30,
    warmup: int = 5,
    throughput_batch: int | None = 32,
    throughput_iterations: int = 5,
) -> LatencyStats:
    """p50/p95 latency at batch 1 and, optionally, throughput at `throughput_batch`.

    Args:
        model: a module, an ONNX path, or an onnxruntime session.
        make_inputs: batch size -> inputs in forward order (e.g. `dlpipe.models.example_inputs`).
    """
    single = _timings(_runner(model, make_inputs(1)), iterations, warmup) * 1000
    stats = LatencyStats(float(np.percentile(single, 50)), float(np.percentile(single, 95)))
    stats.min_ms = float(single.min())
    if throughput_batch:
        batched = _timings(_runner(model, make_inputs(throughput_batch)), throughput_iterations, 1)
        stats.throughput_per_s = float(throughput_batch / np.median(batched))
        stats.batch_size = throughput_batch
    return stats
