"""Properties 5 and 6: what a run logs to MLflow is complete (real sqlite store, one per module)."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mlflow.tracking import MlflowClient
from torch import nn
from torch.utils.data import TensorDataset

from dlpipe.config import config_from_dict
from dlpipe.tracking.experiment import ExperimentTracker
from dlpipe.training.module import LightningModel
from dlpipe.training.trainer import DistributedTrainer

logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
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


# Feature: deep-learning-pipeline, Property 5: Hyperparameter logging completeness
@SETTINGS
@given(raw=configs())
def test_every_config_field_is_logged_and_retrievable(module_mlflow_uri: str, raw: Any) -> None:
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


# Feature: deep-learning-pipeline, Property 6: Metrics recording completeness
@SETTINGS
@given(
    epochs=st.integers(1, 3),
    batches=st.integers(1, 3),
    custom=st.lists(st.sampled_from(["mae", "brier", "top2", "ece"]), unique=True, max_size=3),
    seed=st.integers(0, 1000),
)
def test_every_epoch_records_train_val_and_custom_metrics(
    module_mlflow_uri: str, epochs: int, batches: int, custom: list[str], seed: int
) -> None:
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
