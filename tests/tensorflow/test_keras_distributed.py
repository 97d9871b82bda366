"""Exact resume and MultiWorkerMirroredStrategy, with real Keras training on Fashion-MNIST."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from keras_helpers import keras_weights

from dlpipe.config import PipelineConfig
from dlpipe.training.keras_checkpoint import read_state
from dlpipe.training.keras_fit import config_from_keras_checkpoint, train_keras
from dlpipe.training.trainer import TrainingError


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(
    keras_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    # Dropout and augmentation on: their random draws must continue exactly too.
    cfg = keras_config(
        "training.num_epochs=3",
        "training.deterministic=true",
        "model.dropout=0.3",
        "preprocessing.augment=true",
        "tracking.register_model=false",
    )
    full = train_keras(cfg)
    stopped = train_keras(cfg, stop_after_epochs=1)
    last = Path(stopped.checkpoint or "").parent / "last.keras"
    assert read_state(last)["epoch"] == 1
    after_epoch_1 = keras_weights(last)
    resumed = train_keras(cfg, resume_from=str(last))
    assert read_state(last)["epoch"] == 3  # the resume continued in the checkpoint's folder

    want = keras_weights(Path(full.checkpoint or "").parent / "last.keras")
    got = keras_weights(last)
    assert want.keys() == got.keys()
    assert any(not np.array_equal(after_epoch_1[k], want[k]) for k in want), "epochs 2-3 train"
    for key in want:  # model and optimizer variables, bit for bit
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert resumed.metrics == full.metrics


def test_resume_with_another_plan_is_refused(
    keras_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    cfg = keras_config("data.limit_train_samples=256", "tracking.register_model=false")
    first = train_keras(cfg, stop_after_epochs=1)
    assert config_from_keras_checkpoint(first.checkpoint or "") == cfg  # what --resume reads
    changed = cfg.model_copy(deep=True)
    changed.training.num_epochs = 4
    with pytest.raises(TrainingError, match=r"training\.num_epochs=1 -> 4"):
        train_keras(changed, resume_from=first.checkpoint)


@pytest.mark.slow
def test_two_workers_match_one_process(
    keras_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    # Same samples, same augmentation draws, same number of optimizer steps: 2 workers with
    # 64 samples each per step against 1 process with 128.
    common = (
        "data.limit_train_samples=8000",
        "data.limit_eval_samples=2000",
        "training.num_epochs=2",
        "tracking.register_model=false",
    )
    single = train_keras(keras_config(*common, "training.batch_size=128"))
    pair = train_keras(keras_config(*common, "training.batch_size=64", "training.num_processes=2"))
    assert single.metrics["test/acc"] > 0.8
    assert abs(pair.metrics["test/acc"] - single.metrics["test/acc"]) <= 0.01
    state = read_state(pair.checkpoint or "")
    assert state["config"]["training"]["num_processes"] == 2
