"""GPU safeguards whose control flow runs on the CPU: an out-of-memory batch is split until the
inputs fit, and only an input that does not fit alone gets 503; a load that would not fit on
the GPU is refused. The allocator error is simulated (there is no GPU here); everything around
it -- the app, batcher, dispatch and error handling -- is the real code."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from serving_helpers import png_bytes, ready_client

from dlpipe.monitoring.gpu import GpuReading
from dlpipe.serving import ServeSettings, create_app
from dlpipe.serving.engine import ModelLoadError, check_gpu_headroom, is_out_of_memory
from dlpipe.serving.sources import LocalSource

CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)"


def test_a_batch_that_runs_out_of_memory_is_split_and_only_the_huge_input_gets_503(
    cnn_package: Path,
) -> None:
    cfg = ServeSettings(model_name="fashion", max_batch_size=8, max_wait_ms=50, access_log=False)
    app = create_app(cfg, source=LocalSource.from_path("fashion", cnn_package))
    batches: list[int] = []

    with ready_client(app) as client:
        served, _ = app.state.manager.route()
        real = served.engine.predict_batch

        def tight_memory(batch: Any) -> Any:
            batches.append(len(batch))
            # More than two images, or the one "huge" input (all white), do not fit.
            if len(batch) > 2 or bool((batch.reshape(len(batch), -1).min(axis=1) > 2.0).any()):
                raise RuntimeError(CUDA_OOM)
            return real(batch)

        served.engine.predict_batch = tight_memory

        async def burst() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                images = [np.full((28, 28), 40 * i, np.uint8) for i in range(5)]
                images.append(np.full((28, 28), 255, np.uint8))  # the huge one
                files = [{"file": ("x.png", png_bytes(im), "image/png")} for im in images]
                return list(await asyncio.gather(*(c.post("/predict", files=f) for f in files)))

        responses = client.portal.call(burst)  # type: ignore[union-attr]
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 5 + [503], statuses
    huge = responses[-1]
    assert huge.json()["error"]["type"] == "resource_exhausted"
    assert int(huge.headers["retry-after"]) >= 1 and "CUDA" not in huge.text
    assert batches[0] == 6 and 1 in batches and max(batches[1:]) <= 3  # split, not refused


def test_out_of_memory_is_recognised_in_each_runtimes_words() -> None:
    for text in (CUDA_OOM, "[ONNXRuntimeError] : 6 : Failed to allocate memory for requested buffer",
                 "CUBLAS_STATUS_ALLOC_FAILED", "std::bad_alloc"):  # fmt: skip
        assert is_out_of_memory(RuntimeError(text)), text
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("input 'x' has 3 dimensions"))


def test_a_model_that_would_not_fit_on_the_gpu_is_refused() -> None:
    gpu = GpuReading("0", 10.0, memory_used_bytes=15_000_000_000, memory_total_bytes=16_000_000_000)
    check_gpu_headroom(100_000_000, [gpu], headroom_mb=512)  # 300 MB + 512 MB < 1 GB free
    with pytest.raises(ModelLoadError, match=r"would not fit on GPU 0: needs about 1112 MB"):
        check_gpu_headroom(200_000_000, [gpu], headroom_mb=512)
    check_gpu_headroom(10**12, [], headroom_mb=512)  # no GPU reading: nothing to refuse
