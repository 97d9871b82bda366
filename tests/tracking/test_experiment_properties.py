"""Properties 5 and 6: what a run logs to MLflow is complete (real sqlite store, one per module).

Both frameworks. TensorFlow: two real `train_keras` runs on a slice of Fashion-MNIST, made once
for the module (each starts a TensorFlow worker: seconds); the examples then check what those
runs logged, against the config and against what the TensorFlow worker itself used and
recorded (the config and per-epoch history inside its last.keras).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import TensorDataset

from dlpipe.config import PipelineConfig, config_from_dict, load_config
from dlpipe.tracking.experiment import ExperimentTracker
from dlpipe.training.keras_checkpoint import read_state
from dlpipe.training.module import LightningModel
from dlpipe.training.train import TrainResult
from dlpipe.training.trainer import DistributedTrainer
from keras_session import FRAMEWORKS

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
NAMES = st.text("abcdefghijklmnopqrstuvwxyz_-. 0123456789", min_size=1, max_size=40).filter(
    lambda s: s.strip() == s
)


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """Random valid pipeline configs (as raw dicts) over every section."""
    return {
        "name": draw(NAMES),
        "model": {
            "name": "simple_cnn",
            "dropout": draw(st.floats(0.0, 0.9)),
            "num_classes": draw(st.integers(2, 1000)),
            "extra": draw(st.dictionaries(st.sampled_from(["width", "depth"]), st.integers(1, 64))),
        },
        "data": {
            "seed": draw(st.integers(0, 2**31)),
            "val_fraction": draw(st.floats(0.01, 0.49)),
            "limit_train_samples": draw(st.none() | st.integers(1, 10**6)),
        },
        "preprocessing": {
            "augment": draw(st.booleans()),
            "normalization_mean": [draw(st.floats(-1, 1))],
            "normalization_std": [draw(st.floats(0.01, 2))],
            "class_names": draw(st.none() | st.lists(NAMES, min_size=1, max_size=12)),
        },
        "training": {
            "learning_rate": draw(st.floats(1e-8, 10.0)),
            "batch_size": draw(st.integers(1, 4096)),
            "num_epochs": draw(st.integers(1, 1000)),
            "scheduler": draw(st.sampled_from(["cosine", "onecycle", "none"])),
            "precision": draw(st.sampled_from(["32", "bf16-mixed"])),
            "strategy": draw(st.sampled_from(["auto", "ddp", "ray"])),
            "num_processes": draw(st.integers(1, 8)),
            "gradient_clip_val": draw(st.none() | st.floats(0.01, 10)),
            "experiment_name": draw(NAMES),
        },
        "optimize": {"targets": draw(st.lists(st.sampled_from(["onnx", "int8", "fp16"])))},
    }


KERAS_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist_keras.yaml"
KERAS_RUNS = {  # two tiny real runs that differ in most hyperparameters
    "keras-a": (
        "training.num_epochs=3", "training.scheduler=cosine", "training.learning_rate=0.002",
        "training.weight_decay=0.01", "training.gradient_clip_val=0.5", "model.dropout=0.2",
        "training.seed=7", "training.monitor=val/loss", "training.monitor_mode=min",
    ),
    "keras-b": (
        "training.num_epochs=2", "training.scheduler=onecycle", "training.batch_size=32",
        "training.accumulate_grad_batches=2", "preprocessing.augment=true",
        "training.early_stopping_patience=3", "data.seed=3", "training.save_top_k=0",
    ),
}  # fmt: skip
EPOCH_KEYS = ["train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1"]


@dataclass
class KerasRun:
    cfg: PipelineConfig
    result: TrainResult
    params_while_running: dict[str, str]  # read from the store during its first epoch


@pytest.fixture(scope="module")
def keras_runs(module_mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from dlpipe.training.keras_fit import train_keras

    root = tmp_path_factory.mktemp("keras-runs")
    client = MlflowClient(module_mlflow_uri)
    runs = {}
    for name, overrides in KERAS_RUNS.items():
        cfg = load_config(KERAS_CONFIG, [
            f"name={name}", f"training.experiment_name={name}", "tracking.register_model=false",
            "data.limit_train_samples=256", "data.limit_eval_samples=128",
            f"training.checkpoint_dir={root / name}", *overrides,
        ])  # fmt: skip
        seen: dict[str, str] = {}

        def first_epoch(
            epoch: int, _: dict[str, float], name: str = name, seen: Any = seen
        ) -> None:
            if epoch == 0:  # the run is still going: what can anyone read already?
                experiment = client.get_experiment_by_name(name)
                assert experiment is not None
                running = client.search_runs(
                    [experiment.experiment_id], "attributes.status = 'RUNNING'"
                )
                assert len(running) == 1
                seen.update(running[0].data.params)

        runs[name] = KerasRun(cfg, train_keras(cfg, on_epoch=first_epoch), seen)
    return runs


def keras_params_logged(runs: dict[str, KerasRun], name: str, key: str) -> None:
    """Property 5 for `train_keras`: every hyperparameter, readable from the store while the
    run goes on and after it, is the value the TensorFlow worker trained with."""
    run = runs[name]
    params = run.cfg.flat_params()
    logged = MlflowClient().get_run(run.result.run_id).data.params  # a separate reader
    assert logged == params == run.params_while_running
    # The worker's own copy of the config (in its checkpoint) gives the same value.
    used = PipelineConfig.model_validate(read_state(run.result.checkpoint or "")["config"])
    assert used.flat_params()[key] == logged[key] == params[key]


# Feature: deep-learning-pipeline, Property 5: Hyperparameter logging completeness
@pytest.mark.parametrize("framework", FRAMEWORKS)
@SETTINGS
@given(raw=configs(), keras=st.data())
def test_every_config_field_is_logged_and_retrievable(
    request: pytest.FixtureRequest, module_mlflow_uri: str, framework: str, raw: Any, keras: Any
) -> None:
    if framework == "tensorflow":
        runs = request.getfixturevalue("keras_runs")
        name = keras.draw(st.sampled_from(sorted(runs)), label="run")
        key = keras.draw(st.sampled_from(sorted(runs[name].cfg.flat_params())), label="param")
        keras_params_logged(runs, name, key)
        return
    cfg = config_from_dict(raw)
    params = cfg.flat_params()
    tracker = ExperimentTracker(module_mlflow_uri, experiment_name="p5")
    run_id = tracker.start_run(cfg.name, params)
    # Retrieved through a separate client, as anyone reading the store would.
    logged = MlflowClient(module_mlflow_uri).get_run(run_id).data.params
    tracker.end_run()
    assert logged == params
    # Every leaf of every section is there, under its dotted name.
    dumped = cfg.model_dump(mode="json")
    for section, values in dumped.items():
        if not isinstance(values, dict):
            assert section in logged
            continue
        for key, value in values.items():
            if isinstance(value, dict) and value:
                assert all(f"{section}.{key}.{k}" in logged for k in value)
            else:
                assert f"{section}.{key}" in logged
    assert logged["training.learning_rate"] == str(cfg.training.learning_rate)
    assert logged["training.batch_size"] == str(cfg.training.batch_size)


class WithCustomMetrics(LightningModel):
    """The recipe plus user-defined validation metrics."""

    def __init__(self, custom: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.custom = custom

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().validation_step(batch, batch_idx)
        for i, name in enumerate(self.custom):
            self.log(f"val/{name}", out["loss"] * (i + 1), batch_size=batch[1].shape[0])
        return out


def keras_epoch_recorded(runs: dict[str, KerasRun], name: str, epoch: int, keys: list[str]) -> None:
    """Property 6 for `train_keras`: each epoch's training and validation metrics (val/f1 is
    dlpipe's own, beyond Keras's) are in the store once, finite, and are the values the
    TensorFlow worker computed (its history in last.keras)."""
    run = runs[name]
    client = MlflowClient()
    logged = set(client.get_run(run.result.run_id).data.metrics)
    assert logged == {*EPOCH_KEYS, "test/loss", "test/acc", "test/f1", "data/skipped_samples"}
    last = Path(run.result.checkpoint or "").with_name("last.keras")
    history = read_state(last)["history"]
    assert len(history) == run.cfg.training.num_epochs
    for key in keys:
        values = [m for m in client.get_metric_history(run.result.run_id, key) if m.step == epoch]
        assert len(values) == 1, (key, epoch)
        assert math.isfinite(values[0].value)
        assert values[0].value == history[epoch][key], (key, epoch)


# Feature: deep-learning-pipeline, Property 6: Metrics recording completeness
@pytest.mark.parametrize("framework", FRAMEWORKS)
@SETTINGS
@given(
    epochs=st.integers(1, 3),
    batches=st.integers(1, 3),
    custom=st.lists(st.sampled_from(["mae", "brier", "top2", "ece"]), unique=True, max_size=3),
    seed=st.integers(0, 1000),
    keras=st.data(),
)
def test_every_epoch_records_train_val_and_custom_metrics(
    request: pytest.FixtureRequest,
    module_mlflow_uri: str,
    framework: str,
    epochs: int,
    batches: int,
    custom: list[str],
    seed: int,
    keras: Any,
) -> None:
    if framework == "tensorflow":
        runs = request.getfixturevalue("keras_runs")
        name = keras.draw(st.sampled_from(sorted(runs)), label="run")
        epoch = keras.draw(st.integers(0, runs[name].cfg.training.num_epochs - 1), label="epoch")
        keys = keras.draw(st.lists(st.sampled_from(EPOCH_KEYS), min_size=1, unique=True),
                          label="metrics")  # fmt: skip
        keras_epoch_recorded(runs, name, epoch, keys)
        return
    torch.manual_seed(seed)
    x, y = torch.randn(4 * batches, 3), torch.randint(0, 2, (4 * batches,))
    data = pl.LightningDataModule.from_datasets(
        train_dataset=TensorDataset(x, y), val_dataset=TensorDataset(x, y), batch_size=4
    )
    model = WithCustomMetrics(custom, net=nn.Linear(3, 2), num_classes=2, scheduler="cosine")
    tracker = ExperimentTracker(module_mlflow_uri, experiment_name="p6")
    run_id = tracker.start_run("p6", {})
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config_from_dict(
            {"training": {"num_epochs": epochs, "progress_bar": False, "save_top_k": 0}}
        )
        DistributedTrainer(cfg, tracker=tracker, checkpoint_dir=Path(tmp)).train(model, data)
    tracker.end_run()

    client = MlflowClient(module_mlflow_uri)
    expected = ["train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1"]
    expected += [f"val/{name}" for name in custom]
    assert set(client.get_run(run_id).data.metrics) == set(expected)
    for key in expected:
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == list(range(epochs)), key
        assert all(torch.isfinite(torch.tensor(m.value)) for m in history)
