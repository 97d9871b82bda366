"""Exact resume (stop after epoch 1, resume, compare) and corrupted-checkpoint fallback."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from dlpipe.config import PipelineConfig
from dlpipe.training import train
from dlpipe.training.checkpoint import (
    CheckpointCorruptedWarning,
    CheckpointError,
    UnverifiedCheckpointWarning,
    checksum_path,
    resolve_checkpoint,
    verify_checkpoint,
)


class StopAfterEpoch(pl.Callback):
    """Simulates an interrupted job: stop once `epochs` epochs are done."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


RESUME_OVERRIDES = (
    "training.num_epochs=3",
    "training.precision='32'",  # quoted: a bare 32 is read as a YAML integer
    "training.deterministic=true",
    "tracking.register_model=false",
    "tracking.log_checkpoint=false",
)


@pytest.mark.slow
def test_resumed_run_ends_with_the_same_weights(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    cfg = fmnist_config(*RESUME_OVERRIDES)
    ckpt_root = Path(cfg.training.checkpoint_dir)
    full = train(cfg)
    stopped = train(cfg, callbacks=[StopAfterEpoch(1)])
    stopped_last = ckpt_root / stopped.run_id / "last.ckpt"
    assert torch.load(stopped_last, weights_only=True)["epoch"] == 0
    after_epoch_1 = _final_weights(ckpt_root / stopped.run_id)
    resumed = train(cfg, resume_from=str(stopped_last))
    # Resuming continues in the checkpoint's own folder: its last.ckpt now holds epoch 3.
    assert torch.load(stopped_last, weights_only=True)["epoch"] == 2

    want = _final_weights(ckpt_root / full.run_id)
    got = _final_weights(ckpt_root / stopped.run_id)
    assert want.keys() == got.keys()
    assert any(not torch.equal(after_epoch_1[k], want[k]) for k in want), "epochs 2-3 must train"
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=0, msg=key)
    assert resumed.metrics["test/acc"] == pytest.approx(full.metrics["test/acc"], abs=1e-6)


def test_corrupted_checkpoint_falls_back_to_previous_good_one(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    cfg = fmnist_config(
        "training.num_epochs=2", "training.save_top_k=2", "tracking.register_model=false"
    )
    result = train(cfg)
    run_dir = Path(cfg.training.checkpoint_dir) / result.run_id
    last = run_dir / "last.ckpt"
    assert (run_dir / "last.ckpt.sha256").is_file()
    assert resolve_checkpoint(last) == last

    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    last.write_bytes(bytes(data))
    with pytest.warns(CheckpointCorruptedWarning, match="checksum mismatch"):
        used = resolve_checkpoint(last)
    assert used != last and used.parent == run_dir and used.suffix == ".ckpt"
    assert last.read_bytes() == bytes(data), "the corrupted file is left as it was"

    # train(resume_from=corrupted) resumes from the good one, with the warning.
    with pytest.warns(CheckpointCorruptedWarning):
        resumed = train(cfg.model_copy(), resume_from=str(last))
    assert resumed.metrics["test/acc"] > 0

    for other in run_dir.glob("*.ckpt"):
        other.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no other good checkpoint"):
        resolve_checkpoint(last)


def test_checkpoint_without_its_checksum_resumes_when_named(
    fmnist_config: Callable[..., PipelineConfig], tmp_mlflow_uri: str
) -> None:
    # What a crash between writing last.ckpt and its sidecar leaves behind.
    cfg = fmnist_config("training.num_epochs=2", "tracking.register_model=false")
    stopped = train(cfg, callbacks=[StopAfterEpoch(1)])
    last = Path(cfg.training.checkpoint_dir) / stopped.run_id / "last.ckpt"
    checksum_path(last).unlink()
    with pytest.warns(UnverifiedCheckpointWarning, match="no checksum"):
        resumed = train(cfg, resume_from=str(last))
    assert resumed.metrics["test/acc"] > 0
    assert torch.load(last, weights_only=True)["epoch"] == 1
    assert verify_checkpoint(last) is None  # rewritten by the resumed run, with its checksum
