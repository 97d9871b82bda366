"""The naive baseline: a FastAPI endpoint calling PyTorch eager once per request (no batching).

    python benchmarks/naive_server.py --package /tmp/dlpipe-bench/cnn --port 8001

This is the hand-written server the issue measures against: same preprocessing code, same
response shape, but one forward pass per request on the event loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, UploadFile

from dlpipe.data import DataPreprocessor
from dlpipe.tracking.package import load_package_config, load_torch_model


def build_app(package: str) -> FastAPI:
    net = load_torch_model(package)
    cfg = load_package_config(package)
    pre = DataPreprocessor(cfg.preprocessing)
    names = cfg.preprocessing.class_names
    app = FastAPI(title="naive baseline")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/predict")
    async def predict(file: UploadFile) -> dict[str, Any]:
        started = time.perf_counter()
        x = torch.from_numpy(np.asarray(pre.preprocess_inference_batch([await file.read()])))
        with torch.inference_mode():
            probs = torch.softmax(net(x), dim=1)[0]
        top = torch.topk(probs, min(5, probs.shape[0]))
        return {
            "predictions": [
                {"label": names[i] if names else str(i), "probability": float(p)}
                for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            ],
            "model_version": "naive",
            "latency_ms": (time.perf_counter() - started) * 1000.0,
        }

    return app


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="naive PyTorch-eager FastAPI server")
    p.add_argument("--package", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    cores = len(os.sched_getaffinity(0))  # the cores this process may use (taskset aware)
    p.add_argument("--threads", type=int, default=cores, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # all cores, whatever OMP_NUM_THREADS the caller set
    uvicorn.run(build_app(args.package), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
