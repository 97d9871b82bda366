"""Properties 3 and 7: checkpoints restore everything and contain everything.

Both frameworks. PyTorch: a tiny Lightning run per example. TensorFlow: Keras training runs in
one TensorFlow process for the module (`keras_session`): each recipe's uninterrupted run and
each resume are real `keras_worker` runs, made once and shared by the examples (tracing a
Keras model's training step takes about a second, so a run per example would take minutes);
each example then checks a real checkpoint and trains the restored model and the live one
further on batches it draws.
"""

from __future__ import annotations

import copy
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from dlpipe.config import PipelineConfig, load_config
from dlpipe.training.checkpoint import (
    ResumeStateCallback,
    config_from_checkpoint,
    verify_checkpoint,
)
from dlpipe.training.keras_checkpoint import (
    read_state,
    resolve_keras_checkpoint,
    verify_keras_checkpoint,
)
from dlpipe.training.trainer import DistributedTrainer
from keras_session import (
    FRAMEWORKS,
    KerasSession,
    Splits,
    keras_archive,
    recorded,
    same_arrays,
    write_job,
)

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


# -- TensorFlow: real keras_worker runs, shared by the examples -----------------------------

KERAS_BASE = (
    "model.name=keras_cnn",
    "model.framework=tensorflow",
    "model.num_classes=3",
    "model.extra={width: 2}",
    "preprocessing.image_size=[6,6]",
    "preprocessing.normalization_mean=[0.5]",
    "preprocessing.normalization_std=[0.25]",
    "training.batch_size=4",
    "training.deterministic=true",
    "training.save_top_k=1",
)
# What a resume must carry over, spread over three recipes: the cosine and one-cycle schedules,
# dropout seed states and augmentation draws, gradient accumulation with clipping and weight
# decay, early-stopping counters, a constant rate with a ragged last batch and no best.keras.
KERAS_RECIPES: dict[str, tuple[str, ...]] = {
    "cosine-dropout-augment": (
        "training.scheduler=cosine", "model.dropout=0.3", "preprocessing.augment=true",
        "training.num_epochs=3", "training.monitor=val/loss", "training.monitor_mode=min",
        "training.seed=3",
    ),
    "onecycle-accumulate-clip": (
        "training.scheduler=onecycle", "training.accumulate_grad_batches=2",
        "training.gradient_clip_val=1.0", "training.weight_decay=0.05",
        "training.early_stopping_patience=4", "training.num_epochs=2", "training.seed=11",
    ),
    "constant-ragged-no-best": (
        "training.scheduler=none", "training.learning_rate=0.05", "training.batch_size=5",
        "training.save_top_k=0", "model.dropout=0.0", "training.num_epochs=2", "training.seed=5",
    ),
}  # fmt: skip
KERAS_SAMPLES = {"train": 13, "val": 6, "test": 6}


@dataclass
class KerasRun:
    """A real worker run: its config, job directory, kept-model key and what it recorded."""

    cfg: PipelineConfig
    job: Path
    key: str
    reply: dict[str, Any]

    @property
    def arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = self.reply["arrays"]
        return arrays

    def published(self, epoch: int, kind: str = "last") -> Path:
        return self.job / "checkpoints" / "published" / f"epoch{epoch}.{kind}.keras"

    def state(self, epoch: int) -> Any:
        return json.loads(str(self.arrays[f"epoch{epoch}/state"]))


class KerasRuns:
    """Each recipe's uninterrupted run and its resumes, made on first use."""

    def __init__(self, session: KerasSession, root: Path) -> None:
        self.session, self.root = session, root
        self.runs: dict[tuple[str, int], KerasRun] = {}
        self.saves = 0

    def config(self, recipe: str) -> PipelineConfig:
        return load_config(None, [*KERAS_BASE, *KERAS_RECIPES[recipe]])

    def splits(self, recipe: str) -> Splits:
        rng = np.random.default_rng(sorted(KERAS_RECIPES).index(recipe))
        return Splits({
            split: [(rng.integers(0, 256, (6, 6, 1), dtype=np.uint8), i % 3) for i in range(n)]
            for split, n in KERAS_SAMPLES.items()
        })  # fmt: skip

    def fresh_dir(self) -> Path:
        self.saves += 1
        return self.root / "saved" / str(self.saves)

    def uninterrupted(self, recipe: str) -> KerasRun:
        return self.resumed(recipe, 0)

    def resumed(self, recipe: str, epochs_done: int) -> KerasRun:
        """`epochs_done` 0: the uninterrupted run; else a resume from its checkpoint after
        that many epochs (a copy of its last.keras then), through the parent's checks."""
        if (recipe, epochs_done) not in self.runs:
            cfg = self.config(recipe)
            resume = None
            if epochs_done:
                copy_ = self.uninterrupted(recipe).published(epochs_done - 1)
                resume = resolve_keras_checkpoint(copy_)  # verified against its sidecar
            job = self.root / f"{recipe}-{epochs_done}"
            write_job(job, cfg, self.splits(recipe), resume=resume)
            key = f"{recipe}-{epochs_done}"
            self.runs[(recipe, epochs_done)] = KerasRun(cfg, job, key, self.session.train(job, key))
        return self.runs[(recipe, epochs_done)]


@pytest.fixture(scope="module")
def keras_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KerasRuns]:
    with KerasSession() as session:
        yield KerasRuns(session, tmp_path_factory.mktemp("keras-runs"))


@st.composite
def keras_examples(draw: st.DrawFn) -> SimpleNamespace:
    """A recipe, a point in its run, and further training: batches of any size and scale."""
    recipe = draw(st.sampled_from(sorted(KERAS_RECIPES)))
    epochs = int(next(o for o in KERAS_RECIPES[recipe] if "num_epochs" in o).split("=")[1])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))
    batches = [
        (
            (rng.standard_normal((size, 1, 6, 6)) * scale).astype(np.float32),
            rng.integers(0, 3, size).astype(np.int64),
        )
        for size in draw(st.lists(st.integers(1, 6), min_size=1, max_size=3))
    ]
    probe = (rng.standard_normal((draw(st.integers(1, 5)), 1, 6, 6)) * scale).astype(np.float32)
    return SimpleNamespace(
        recipe=recipe,
        epochs=epochs,
        stop_after=draw(st.integers(1, epochs - 1)),  # epochs done when the run stops
        batches=batches,
        probe=probe,
        improved=draw(st.booleans()),
    )


def assert_arrays_equal(got: list[np.ndarray], want: list[np.ndarray], what: str) -> None:
    assert len(got) == len(want) and len(want) > 0, what
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_array_equal(a, b, err_msg=f"{what} {i}")


def keras_round_trip(runs: KerasRuns, ex: SimpleNamespace) -> None:
    """A Keras checkpoint restores weights, optimizer and seed states, and the run's state."""
    full = runs.uninterrupted(ex.recipe)
    resumed = runs.resumed(ex.recipe, ex.stop_after)
    at = f"epoch{ex.stop_after - 1}"  # what the uninterrupted run held when it saved that file
    # The resume restored exactly the live state of the run when the checkpoint was saved:
    # every weight, batch-norm statistic and dropout seed state, every optimizer variable.
    for part in ("model", "optimizer"):
        assert_arrays_equal(
            recorded(resumed.arrays, "restored", part), recorded(full.arrays, at, part), part
        )
    assert int(resumed.arrays["restored/epoch"]) == ex.stop_after  # the next epoch to run
    saved = read_state(full.published(ex.stop_after - 1))
    assert {k: saved[k] for k in full.state(ex.stop_after - 1)} == full.state(ex.stop_after - 1)
    assert saved["config"] == full.cfg.model_dump(mode="json")
    # ...and training went on as if never stopped: the same variables, bit for bit, and the
    # same metrics and early-stopping state after every later epoch.
    last = f"epoch{ex.epochs - 1}"
    for part in ("model", "optimizer"):
        assert_arrays_equal(recorded(resumed.arrays, last, part), recorded(full.arrays, last, part),
                            f"final {part}")  # fmt: skip
    for epoch in range(ex.stop_after, ex.epochs):  # (a resumed state also keeps the config)
        want = full.state(epoch)
        assert {k: resumed.state(epoch)[k] for k in want} == want
    # So does any further training of the restored model against the live one, step by step.
    after = runs.session.steps({full.key: at, resumed.key: "restored"}, ex.batches, ex.probe)
    for part in ("model", "optimizer"):
        assert_arrays_equal(recorded(after, resumed.key, part), recorded(after, full.key, part),
                            f"trained {part}")  # fmt: skip
    np.testing.assert_array_equal(after[f"{resumed.key}/logits"], after[f"{full.key}/logits"])
    moved = recorded(after, full.key, "model")
    assert any(not np.array_equal(a, b) for a, b in zip(moved, recorded(full.arrays, at, "model"),
                                                         strict=True)), "the steps trained"  # fmt: skip


def check_keras_checkpoint(
    path: Path,
    live: dict[str, np.ndarray],
    prefix: str,
    paths: list[str],
    state: dict[str, Any],
    cfg: PipelineConfig,
) -> None:
    """A `.keras` checkpoint holds the model's weights, the optimizer's state and dlpipe's
    training metadata, each equal to the live values (`live`, under `prefix`) when saved."""
    assert verify_keras_checkpoint(path) is None, path  # intact, checksum sidecar matches
    archive = keras_archive(path)
    assert {"config.json", "metadata.json", "model.weights.h5", "dlpipe_state.json"} <= set(
        archive["names"]
    )
    model = recorded(live, prefix, "model")
    weights = [v for v, p in zip(model, paths, strict=True) if "seed_generator" not in p]
    seeds = [v for v, p in zip(model, paths, strict=True) if "seed_generator" in p]
    assert same_arrays(list(archive["layers"].values()), weights)  # every weight, nothing else
    assert_arrays_equal(archive["optimizer"], recorded(live, prefix, "optimizer"), "optimizer")
    saved = dict(archive["state"])
    in_file = [
        np.asarray(value, dtype=seeds[0].dtype)
        for states in saved.pop("seed_states").values()
        for value in states
    ]
    assert same_arrays(in_file, seeds)  # dropout's random streams (.keras files skip them)
    assert saved == {**state, "config": cfg.model_dump(mode="json")}


def keras_contents(runs: KerasRuns, ex: SimpleNamespace) -> None:
    """Every Keras checkpoint a run published, and one saved at any later point."""
    run = runs.uninterrupted(ex.recipe)
    paths = run.reply["model_paths"]
    epoch = ex.stop_after - 1
    info = run.reply["epochs"][epoch]
    at = f"epoch{epoch}"
    state = run.state(epoch)
    # The files the run published after that epoch: last.keras, and best.keras exactly when
    # the monitored value improved and save_top_k keeps one.
    keep_best = run.cfg.training.save_top_k >= 1
    assert info["files"] == ["last"] + (["best"] if info["improved"] and keep_best else [])
    assert info["improved"] == (state["best_epoch"] == epoch)
    for kind in info["files"]:
        check_keras_checkpoint(run.published(epoch, kind), run.arrays, at, paths, state, run.cfg)
    # The metadata: epochs done, per-epoch losses, accuracy and learning rate, the monitor.
    assert state["epoch"] == epoch + 1 and len(state["history"]) == epoch + 1
    for record in state["history"]:
        assert {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc", "val/f1"} <= set(
            record
        )
    assert state["history"][-1]["train/lr"] == pytest.approx(info["lr"], rel=1e-6)
    monitored = [r[run.cfg.training.monitor] for r in state["history"]]
    best = (max if run.cfg.training.monitor_mode == "max" else min)(monitored)
    assert state["best"] == best and monitored[state["best_epoch"]] == best
    # The optimizer had stepped, and keeps more than a step count (moments, accumulators).
    assert info["iterations"] > 0 and len(recorded(run.arrays, at, "optimizer")) > 2
    # A checkpoint the worker saves at any other point of training holds that point's values.
    after = runs.session.steps({run.key: at}, ex.batches, ex.probe)
    target = runs.fresh_dir()
    live = runs.session.save(run.key, target, state, ex.improved)
    for part in ("model", "optimizer"):
        assert_arrays_equal(recorded(live, "saved", part), recorded(after, run.key, part), part)
    names = ["last.keras"] + (["best.keras"] if ex.improved and keep_best else [])
    assert sorted(p.name for p in target.glob("*.keras")) == sorted(names)
    for name in names:
        check_keras_checkpoint(target / name, live, "saved", paths, state, run.cfg)


# Feature: deep-learning-pipeline, Property 3: Checkpoint round-trip preservation
@pytest.mark.parametrize("framework", FRAMEWORKS)
@SETTINGS
@given(run=runs(), keras=keras_examples())
def test_checkpoint_round_trip_preserves_training_state(
    request: pytest.FixtureRequest, tiny: SimpleNamespace, framework: str, run: Any, keras: Any
) -> None:
    if framework == "tensorflow":
        keras_round_trip(request.getfixturevalue("keras_runs"), keras)
        return
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
@pytest.mark.parametrize("framework", FRAMEWORKS)
@SETTINGS
@given(run=runs(), top_k=st.integers(0, 3), keras=keras_examples())
def test_every_checkpoint_contains_weights_optimizer_and_metadata(
    request: pytest.FixtureRequest,
    tiny: SimpleNamespace,
    framework: str,
    run: Any,
    top_k: int,
    keras: Any,
) -> None:
    if framework == "tensorflow":
        keras_contents(request.getfixturevalue("keras_runs"), keras)
        return
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
