"""Ray Train's `training.storage_path` reaches Ray as written. That the driver takes the model
from Ray's storage is checked by the Ray run of tests/training/test_distributed.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dlpipe.config import PipelineConfig
from dlpipe.training.ray_fit import run_config, storage_location
from dlpipe.training.trainer import DistributedTrainer


def test_storage_path_uri_reaches_ray_unchanged(
    fmnist_config: Callable[..., PipelineConfig], tmp_path: Path
) -> None:
    pytest.importorskip("ray.train", reason="ray[train] is not installed")
    s3 = fmnist_config("training.strategy=ray", "training.storage_path=s3://bucket/dlpipe/runs")
    # A URI goes to Ray (and through it to pyarrow's S3 filesystem) as written, not as a path.
    assert storage_location(DistributedTrainer(s3)) == "s3://bucket/dlpipe/runs"
    nfs = fmnist_config("training.strategy=ray", "training.storage_path=shared/ray")
    assert storage_location(DistributedTrainer(nfs)) == str(Path("shared/ray").absolute())
    local = DistributedTrainer(fmnist_config("training.strategy=ray"), checkpoint_dir=tmp_path)
    config = run_config(local)
    assert config.storage_path == str(tmp_path / "ray_storage")
    assert config.failure_config is not None and config.failure_config.max_failures == 0
