"""TensorFlow-side pieces of Keras training: cluster environment, strategy, schedule, seeds.

Used by `keras_worker` (a TensorFlow process); importing this module imports no framework, its
functions import TensorFlow/Keras when called.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import numpy as np

from dlpipe.config import PipelineConfig


def configure_tensorflow(job: dict[str, Any], rank: int) -> None:
    """Environment TensorFlow reads at import: cluster spec, log level, thread counts."""
    world = int(job["world"])
    if world > 1:
        workers = [f"localhost:{port}" for port in job["ports"]]
        os.environ["TF_CONFIG"] = json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": rank}}
        )
    else:
        os.environ.pop("TF_CONFIG", None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_strategy(world: int) -> Any:
    """The default strategy for one process; `MultiWorkerMirroredStrategy` for several.

    Keras 3.15's `fit` passes structures and scalars to `strategy.reduce`, which the
    multi-worker strategy refuses (tensorflow/tensorflow#72388: "Invalid reduction dimension 0
    for input with 0 dimensions"); this subclass reduces leaf by leaf, scalars over replicas.
    """
    import tensorflow as tf

    if world == 1:
        return tf.distribute.get_strategy()

    class NestedReduceStrategy(tf.distribute.MultiWorkerMirroredStrategy):  # type: ignore[misc]
        def reduce(self, reduce_op: Any, value: Any, axis: Any = None) -> Any:
            def one(v: Any) -> Any:
                local = self.experimental_local_results(v)[0]
                leaf_axis = None if getattr(local.shape, "rank", None) == 0 else axis
                return super(NestedReduceStrategy, self).reduce(reduce_op, v, axis=leaf_axis)

            return tf.nest.map_structure(one, value)

    return NestedReduceStrategy()


def learning_rate(cfg: PipelineConfig, total_batches: int) -> Any:
    """The schedule for `training.scheduler` over `total_batches` training batches."""
    import keras

    t = cfg.training
    total = max(1, total_batches)
    if t.scheduler == "onecycle":  # PyTorch OneCycleLR's shape: 30 % warm-up from lr/25, cosine
        warm = max(1, int(0.3 * total))
        return keras.optimizers.schedules.CosineDecay(
            t.learning_rate / 25.0,
            max(1, total - warm),
            alpha=1.0 / (25.0 * 1e4),
            warmup_target=t.learning_rate,
            warmup_steps=warm,
        )
    if t.scheduler == "cosine":
        return keras.optimizers.schedules.CosineDecay(t.learning_rate, total)
    return t.learning_rate


def seed_states(model: Any) -> dict[str, list[list[int]]]:
    """Dropout seed-generator states per layer: `.keras` files do not keep them."""
    return {
        layer.name: [np.asarray(v.numpy()).tolist() for v in _seed_variables(layer)]
        for layer in model.layers
    }


def restore_seed_states(model: Any, states: dict[str, list[list[int]]]) -> None:
    for layer in model.layers:
        for variable, value in zip(_seed_variables(layer), states.get(layer.name, []), strict=True):
            variable.assign(np.asarray(value, dtype=variable.dtype))


def _seed_variables(layer: Any) -> list[Any]:
    return [v for v in layer.variables if "seed_generator_state" in v.path]


def set_threads(tf: Any, world: int) -> None:
    """Thread pools: several workers on one machine split the cores instead of fighting."""
    threads = os.environ.get("DLPIPE_TF_THREADS") or os.environ.get("OMP_NUM_THREADS")
    if threads is None and world > 1:
        threads = str(max(1, (os.cpu_count() or 1) // world))
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(int(threads))
        tf.config.threading.set_inter_op_parallelism_threads(1 if world > 1 else 2)


def exit_with_parent(interval: float = 2.0) -> None:
    """End this worker when the process that started it is gone (killed, not just failed):
    an orphan would keep both cores busy, and its peers would wait for it forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="dlpipe-parent-watch", daemon=True).start()
