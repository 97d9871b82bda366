"""Canary test helpers: a small CNN really trained on Fashion-MNIST, its class-swapped copy,
recorded predictions on the test set, and a replay of the canary's decision logic over them."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from serving_helpers import CLASS_NAMES, export_onnx

from dlpipe.config import PipelineConfig
from dlpipe.data import DataPreprocessor
from dlpipe.models import create_model
from dlpipe.quality.canary import Canary, CanaryPolicy, Decision
from dlpipe.tracking.metadata import ModelMetadata, utc_now
from dlpipe.tracking.package import save_model_package

TRAIN_IMAGES = 20_000
EPOCHS = 2


def _config() -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "model": {"name": "simple_cnn", "extra": {"width": 8}},
            "preprocessing": {"class_names": CLASS_NAMES, "augment": False},
        }
    )


def train_package(root: Path, train: Any, test: Any) -> tuple[Path, np.ndarray]:
    """A simple_cnn (width 8) trained for a few seconds on 20k training images, as an ONNX
    package (version "1"); and its predicted classes on the test images."""
    cfg = _config()
    pre = DataPreprocessor(cfg.preprocessing)
    torch.manual_seed(0)
    net = create_model("simple_cnn", 10, 1, width=8)
    x = torch.from_numpy(pre.preprocess_inference_batch(list(train.images[:TRAIN_IMAGES])))
    y = torch.from_numpy(np.asarray(train.labels[:TRAIN_IMAGES], dtype=np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(x), generator=generator).split(128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        xt = torch.from_numpy(pre.preprocess_inference_batch(list(test.images)))
        predicted = torch.cat([net(b).argmax(1) for b in xt.split(1000)]).numpy()
    accuracy = float((predicted == np.asarray(test.labels)).mean())
    meta = ModelMetadata(
        model_name="fashion",
        framework="onnx",
        precision="fp32",
        model_size_mb=0.0,
        training_date=utc_now(),
        accuracy_metrics={"test/acc": accuracy},
        preprocessing_config=cfg.preprocessing,
        version="1",
    )
    out = root / "trained"
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = export_onnx(net, root / "trained.onnx", (1, 28, 28))
    return save_model_package(out, cfg, meta, onnx_path=onnx_path), predicted


def swap_pair(labels: np.ndarray, predicted: np.ndarray, gap: float = 0.10) -> tuple[int, int]:
    """The two classes whose swap in the output costs closest to `gap` accuracy."""
    n = len(labels)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    best: tuple[float, int, int] = (1.0, 0, 1)
    for i in range(10):
        for j in range(i + 1, 10):
            drop = (confusion[i, i] + confusion[j, j] - confusion[i, j] - confusion[j, i]) / n
            best = min(best, (abs(drop - gap), i, j))
    return best[1], best[2]


def swapped(predicted: np.ndarray, i: int, j: int) -> np.ndarray:
    out = predicted.copy()
    out[predicted == i], out[predicted == j] = j, i
    return out


def class_swap_copy(package: Path, out: Path, i: int, j: int) -> Path:
    """A copy of the package whose graph swaps output columns i and j (a Gather on the logits):
    a version that answers class j where the original answers i, and the other way round."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    shutil.copytree(package, out)
    model = onnx.load(str(out / "model.onnx"))
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:  # the node producing the logits now feeds the Gather
        node.output[:] = [f"{o}_unswapped" if o == output else o for o in node.output]
    order = list(range(10))
    order[i], order[j] = j, i
    graph.initializer.append(numpy_helper.from_array(np.array(order, np.int64), "class_swap"))
    graph.node.append(
        helper.make_node("Gather", [f"{output}_unswapped", "class_swap"], [output], axis=1)
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))
    return out


@dataclass
class Replay:
    outcome: str
    decisions: list[Decision]
    requests: int
    """Requests streamed (each labelled at once) until the canary finished."""


def replay(
    policy: CanaryPolicy,
    champion_correct: np.ndarray,
    candidate_correct: np.ndarray,
    seed: int,
    latency_ms: tuple[float, float] = (2.0, 2.0),
    rps: float = 500.0,
) -> Replay:
    """The canary's decision logic over recorded predictions: the test set streamed (in a
    seeded order, again and again) at `rps`, each request routed by the current step's split,
    answered by the version's recorded prediction, its label fed back at once and its latency
    drawn from a log-normal around the version's median. The same `Canary` and `Window` the
    runner uses; only the log is replaced by records made here."""
    rng = np.random.default_rng(seed)
    canary = Canary(policy, "1", "2")
    correct = {"1": champion_correct, "2": candidate_correct}
    median = {"1": latency_ms[0], "2": latency_ms[1]}
    window = canary.window(since=0.0)
    decisions: list[Decision] = []
    t, sent = 0.0, 0
    order: Iterator[int] = iter(())
    while canary.finished is None:
        records = []
        for _ in range(50):  # one poll of the log
            i = next(order, None)
            if i is None:
                order = iter(rng.permutation(len(champion_correct)))
                i = next(order)
            t += 1.0 / rps
            sent += 1
            version = "2" if rng.random() < canary.share / 100 else "1"
            ms = float(median[version] * rng.lognormal(0.0, 0.25))
            records.append(
                {"type": "prediction", "ts": t, "model_version": version, "status": 200,
                 "latency_ms": ms}
            )  # fmt: skip
            records.append(
                {"type": "feedback", "ts": t + ms / 1000, "model_version": version,
                 "correct": bool(correct[version][i])}
            )  # fmt: skip
        window.add(records)
        if canary.due(window):
            decisions.append(canary.decide(window))
            window = canary.window(since=t)
    return Replay(canary.finished, decisions, sent)
