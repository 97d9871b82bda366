"""Properties 3 and 7: checkpoints restore everything and contain everything."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dlpipe.training.checkpoint import (
    ResumeStateCallback,
    config_from_checkpoint,
    verify_checkpoint,
)
from dlpipe.training.trainer import DistributedTrainer

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)


class CaptureRestoredState(pl.Callback):
    """Records the model/optimizer/scheduler state right after a resume restored it."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # deepcopy: state_dict() hands out the live tensors, which training then changes.
        self.state = copy.deepcopy(
            {
                "weights": {k: v.clone() for k, v in pl_module.state_dict().items()},
                "optimizer": trainer.optimizers[0].state_dict(),
                "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict()
                if trainer.lr_scheduler_configs
                else None,
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
            }
        )

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last hook before the first resumed batch is drawn.
        self.rng = torch.get_rng_state()


def _assert_plain(value: Any, where: str = "") -> None:
    """Only tensors, numbers, strings and containers: loadable with weights_only=True as is."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str | int), where
            _assert_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _assert_plain(v, f"{where}[{i}]")
    else:
        assert value is None or type(value) in (torch.Tensor, int, float, str, bool), where


def _assert_tree_equal(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@st.composite
def runs(draw: st.DrawFn) -> SimpleNamespace:
    epochs = draw(st.integers(2, 3))
    return SimpleNamespace(
        seed=draw(st.integers(0, 2**16)),
        in_dim=draw(st.integers(1, 6)),
        classes=draw(st.integers(2, 4)),
        hidden=draw(st.integers(1, 8)),
        samples=draw(st.integers(4, 24)),
        batch=draw(st.integers(2, 8)),
        lr=draw(st.floats(1e-4, 0.5)),
        scheduler=draw(st.sampled_from(["cosine", "onecycle", "none"])),
        epochs=epochs,
        stop_after=draw(st.integers(1, epochs - 1)),
    )


# Feature: deep-learning-pipeline, Property 3: Checkpoint round-trip preservation
@SETTINGS
@given(run=runs())
def test_checkpoint_round_trip_preserves_training_state(tiny: SimpleNamespace, run: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = tiny.config(
            root,
            f"training.num_epochs={run.epochs}",
            f"training.save_top_k={run.epochs}",  # keep every epoch's checkpoint
            "training.monitor=val/loss",
            "training.monitor_mode=min",
        )

        def fresh() -> tuple[Any, Any]:
            steps = run.epochs * -(-run.samples // run.batch)
            model = tiny.model(
                run.seed, run.in_dim, run.classes, run.hidden, run.lr, run.scheduler, steps
            )
            data = tiny.datamodule(run.seed, run.samples, run.in_dim, run.classes, run.batch)
            return model, data

        pl.seed_everything(run.seed, verbose=False)
        uninterrupted = DistributedTrainer(cfg, checkpoint_dir=root / "a")
        model, data = fresh()
        uninterrupted.train(model, data)
        final = {k: v.clone() for k, v in model.state_dict().items()}

        # A checkpoint from the middle of that run, saved as training went on.
        ckpt = next((root / "a").glob(f"epoch{run.stop_after - 1:03d}-*.ckpt"))
        assert verify_checkpoint(ckpt) is None
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)

        pl.seed_everything(run.seed + 1, verbose=False)  # resuming must not depend on this
        capture = CaptureRestoredState()
        resumed = DistributedTrainer(cfg, callbacks=[capture], checkpoint_dir=root / "b")
        contents = resumed.load_checkpoint(ckpt)
        model, data = fresh()
        resumed.train(model, data)

    restored = capture.state
    _assert_tree_equal(contents["state_dict"], saved["state_dict"], "loaded")
    _assert_tree_equal(restored["weights"], saved["state_dict"], "weights")
    _assert_tree_equal(restored["optimizer"], saved["optimizer_states"][0], "optimizer")
    if run.scheduler != "none":
        _assert_tree_equal(restored["scheduler"], saved["lr_schedulers"][0], "scheduler")
    assert restored["epoch"] == saved["epoch"] + 1 == run.stop_after
    assert restored["global_step"] == saved["global_step"]
    rng = saved["callbacks"][ResumeStateCallback.__name__]["rng"]["torch"]
    assert torch.equal(capture.rng, rng)
    # ...and training continued exactly as if never stopped.
    for key, value in final.items():
        torch.testing.assert_close(model.state_dict()[key], value, atol=1e-6, rtol=0, msg=key)


# Feature: deep-learning-pipeline, Property 7: Checkpoint content completeness
@SETTINGS
@given(run=runs(), top_k=st.integers(0, 3))
def test_every_checkpoint_contains_weights_optimizer_and_metadata(
    tiny: SimpleNamespace, run: Any, top_k: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg = tiny.config(root, f"training.num_epochs={run.epochs}", f"training.save_top_k={top_k}")
        model = tiny.model(run.seed, run.in_dim, run.classes, run.hidden, run.lr, run.scheduler)
        data = tiny.datamodule(run.seed, run.samples, run.in_dim, run.classes, run.batch)
        DistributedTrainer(cfg, checkpoint_dir=root).train(model, data)
        files = sorted(root.glob("*.ckpt"))
        assert root / "last.ckpt" in files
        assert len(files) == 1 + min(top_k, run.epochs)
        contents = [(f, torch.load(f, map_location="cpu", weights_only=True)) for f in files]
        for path, ckpt in contents:
            assert verify_checkpoint(path) is None, path  # checksum sidecar matches
            assert ckpt["state_dict"].keys() == model.state_dict().keys()
            assert ckpt["optimizer_states"] and ckpt["optimizer_states"][0]["state"]
            assert len(ckpt["lr_schedulers"]) == (0 if run.scheduler == "none" else 1)
            assert 0 <= ckpt["epoch"] < run.epochs and ckpt["global_step"] > 0
            assert ckpt["hyper_parameters"]["learning_rate"] == run.lr
            extra = ckpt["callbacks"][ResumeStateCallback.__name__]
            _assert_plain(extra, "ResumeStateCallback")  # nothing needs a safe-globals entry
            assert set(extra["rng"]) == {"torch", "cuda", "numpy", "python"}
            assert extra["sampler"]["epoch"] == ckpt["epoch"] + 1
            assert extra["sampler"]["global_step"] == ckpt["global_step"]
            lrs = [g["lr"] for g in ckpt["optimizer_states"][0]["param_groups"]]
            assert extra["learning_rates"] == lrs
            assert config_from_checkpoint(ckpt) == cfg.model_dump(mode="json")
        last = dict(contents)[root / "last.ckpt"]
        assert last["epoch"] == run.epochs - 1
        torch.testing.assert_close(last["state_dict"], model.state_dict())
