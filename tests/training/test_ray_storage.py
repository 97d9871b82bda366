"""Ray Train's `training.storage_path`: the driver takes the model from Ray's storage, never from
the workers' disks (on a cluster, rank 0's disk is another machine's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dlpipe.config import PipelineConfig
from dlpipe.training.checkpoint import verify_checkpoint
from dlpipe.training.ray_fit import OUTCOME_FILE, run_config, storage_location
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


@pytest.mark.slow
def test_ray_run_takes_its_model_from_shared_storage(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str, tmp_path: Path
) -> None:
    pytest.importorskip("ray.train.lightning", reason="ray[train] is not installed")
    from dlpipe.training import train

    shared = tmp_path / "nfs" / "ray"  # stands for a mount every node shares
    cfg = fmnist_config(
        "training.strategy=ray", "training.num_processes=2", f"training.storage_path={shared}"
    )
    result = train(cfg)
    assert result.model_version == "1"
    reported = sorted(shared.rglob(OUTCOME_FILE))
    assert len(reported) == 1, reported  # rank 0's final report, in the shared storage
    stored = reported[0].parent / Path(result.checkpoint or "").name
    assert stored.is_file() and verify_checkpoint(stored) is None
    # The driver's copy is byte for byte the reported one, and verified.
    local = Path(result.checkpoint or "")
    assert local.read_bytes() == stored.read_bytes() and verify_checkpoint(local) is None
