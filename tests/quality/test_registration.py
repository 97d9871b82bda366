"""Drift profiles at registration: `train` writes one into the registered package, and an ONNX
variant registered by `optimize` carries its parent's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dlpipe.config import load_config
from dlpipe.quality import load_profile

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_training_registers_a_profile_and_variants_inherit_it(
    tmp_path: Path, tmp_mlflow_uri: str, fashion
) -> None:
    from dlpipe.optimize.variants import optimize_version
    from dlpipe.tracking.registry import ModelRegistry
    from dlpipe.training import train

    cfg = load_config(
        ROOT / "configs" / "fashion_mnist.yaml",
        [
            "data.limit_train_samples=256",
            "data.limit_eval_samples=128",
            "training.batch_size=64",
            "training.num_epochs=1",
            "training.progress_bar=false",
            f"training.checkpoint_dir={tmp_path / 'checkpoints'}",
        ],
    )
    result = train(cfg)
    registry = ModelRegistry(tmp_mlflow_uri, cache_dir=tmp_path / "cache")
    parent = load_profile(registry.get_model(result.model_name, result.model_version))
    assert parent is not None, "the registered package has no drift_profile.json"
    assert set(parent.statistics) == {"mean_intensity", "contrast", "pixels"}
    assert parent.source == "val split, 128 inputs" and parent.samples == 128
    # Predicted classes on the test split: one count per class, all 128 test images.
    assert parent.classes is not None and len(parent.classes) == 10
    assert sum(parent.classes) == 128
    assert parent.statistics["pixels"].counts[1] == 128  # every image as uploaded: 28 x 28

    report = optimize_version(
        result.model_name, result.model_version, ["onnx"], 1.0, registry=registry, measure=False
    )
    (variant,) = [v for v in report.variants if v.version]
    child = load_profile(registry.get_model(result.model_name, variant.version))
    assert child is not None and child.to_json() == parent.to_json()
    assert np.isfinite(
        parent.scores({"mean_intensity": np.zeros(10)}, np.zeros(0))["mean_intensity"]
    )
