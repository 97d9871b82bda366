"""Route a request, queue its samples and wait for their logits, within the request deadline.

Routing and queueing run without an `await` in between, so a routing switch can never slip
between choosing a version and queueing on it. Decoding runs there too for small inputs; large
images are decoded in a worker pool (the event loop keeps answering meanwhile), and when routing
switched during that decode the request is routed, and decoded, again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import Request

from dlpipe.monitoring.tracing import BatchTiming, now_ns
from dlpipe.serving.admission import remaining_s
from dlpipe.serving.engine import is_out_of_memory
from dlpipe.serving.errors import (
    BatcherClosed,
    DeadlineExceeded,
    InferenceFailed,
    ResourceExhausted,
    ServingError,
)
from dlpipe.serving.inputs import Sample
from dlpipe.serving.manager import ModelManager
from dlpipe.serving.served import ServedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prepared:
    """How to build a request's samples for a version, and where (None: on the event loop)."""

    make_samples: Callable[[ServedModel], list[Sample]]
    pool: Executor | None = None


async def infer(
    request: Request,
    manager: ModelManager,
    version: str | None,
    request_key: str | None,
    prepared: Prepared | Callable[[ServedModel], list[Sample]],
) -> tuple[ServedModel, list[np.ndarray]]:
    """Logits for every sample the request's `prepared.make_samples(served)` builds, from the
    version routing picks."""
    if not isinstance(prepared, Prepared):
        prepared = Prepared(prepared)
    tracer = getattr(request.app.state, "tracer", None)
    for _attempt in range(3):
        state = manager.state
        served, route = manager.route(version, request_key)
        decode_started = now_ns() if tracer is not None else 0
        if prepared.pool is None:
            samples = prepared.make_samples(served)
        else:
            loop = asyncio.get_running_loop()
            samples = await loop.run_in_executor(prepared.pool, prepared.make_samples, served)
            if manager.state is not state:
                continue  # routing switched while decoding: route (and decode) again
        timeout = remaining_s(request.state, served.timeout_s)
        if timeout <= 0:
            raise DeadlineExceeded("the request deadline passed before inference started")
        timings: list[BatchTiming | None] = [None] * len(samples)
        if tracer is not None:
            tracer.child("decode", decode_started, now_ns(), samples=len(samples))
            timings = [BatchTiming() for _ in samples]
        futures: list[asyncio.Future[Any]] = []
        try:
            for sample, timing in zip(samples, timings, strict=True):
                futures.append(served.batcher.submit_nowait(sample, timeout, timing))
        except BatcherClosed:
            for f in futures:
                f.cancel()
            continue  # routing switched while we were queueing: route again
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        request.state.model_version = served.version
        request.state.route = route  # why this version (the prediction log records it)
        ticket = getattr(request.state, "admission", None)
        if ticket is not None:
            ticket.queued()  # no longer on its way: a batcher may stop waiting for it
        try:
            return served, await _gather(served, futures, timeout)
        finally:
            if tracer is not None:
                batches = {(t.started_ns, t.ended_ns): t for t in timings if t is not None}
                for timing in batches.values():  # one pair of spans per batch it was part of
                    tracer.batch_spans(timing, served.version)
    raise InferenceFailed("routing kept changing; try again")


async def _gather(
    served: ServedModel, futures: list[asyncio.Future[Any]], timeout: float
) -> list[np.ndarray]:
    try:
        if len(futures) == 1:
            return [await asyncio.wait_for(futures[0], timeout)]
        return list(await asyncio.wait_for(asyncio.gather(*futures), timeout))
    except TimeoutError:
        for f in futures:
            f.cancel()
        raise DeadlineExceeded(
            f"no answer from version {served.version} within {served.timeout_s * 1000:.0f} ms"
        ) from None
    except ServingError:
        for f in futures:
            f.cancel()
        raise
    except Exception as err:
        if is_out_of_memory(err):
            # The batcher already split its batch down to this input, which does not fit even
            # alone: a resource problem, maybe passing (other requests hold memory), not a bug.
            raise ResourceExhausted(
                f"version {served.version} ran out of memory for this input; retry later",
                retry_after_s=1.0,
            ) from err
        # The model's own message (ONNX Runtime, numpy) stays in the log: it names internals.
        log.error("inference failed on version %s", served.version, exc_info=err)
        raise InferenceFailed(
            f"inference failed on version {served.version}; the server log has the details "
            "under this request's id"
        ) from err


_UNTRACED = nullcontext()


def responding(request: Request) -> AbstractContextManager[Any]:
    """Times the block as the request's `respond` span (when tracing is on; else nothing)."""
    tracer = request.app.state.tracer
    return _UNTRACED if tracer is None else _respond_span(tracer)


@contextmanager
def _respond_span(tracer: Any) -> Iterator[None]:
    started = now_ns()
    try:
        yield
    finally:
        tracer.child("respond", started, now_ns())
